//! The base schema Lapse contributes. Policy folders add their actions in
//! `*.cedarschema` fragments, e.g.
//! `action "read" appliesTo { principal: Workload, resource: Resource, context: RequestContext };`

/// The base schema, in Cedar schema syntax (`lapse policy schema` prints it).
///
/// - `Workload`: the principal. Its id is the workload URI. Every identity-token claim
///   is a string tag: `principal.hasTag("repository") && principal.getTag("repository") == "acme/shop"`.
/// - `Resource`: the audience (target) of the request.
/// - `RequestContext`: what Lapse knows about the request at decision time.
pub const BASE_SCHEMA: &str = r#"// Lapse base schema. Policy folders add actions in *.cedarschema fragments.

// A non-human identity. Entity id: the workload URI (e.g. spiffe://example.org/ci/deploy).
// Tags: every claim of the identity token, as a string.
entity Workload {
  // The workload URI again, as a string, so policies can match it with `like`.
  uri: String,
  // `iss` of the identity token that proved the workload.
  issuer: String,
  // `sub` of that identity token.
  subject: String,
} tags String;

// The target of a request (the token's audience). Entity id: the audience.
entity Resource;

type RequestContext = {
  // The task the access is for, and why.
  task: String,
  purpose: String,
  // Ticket or change reference; "" when none was given.
  ticket: String,
  // Requested lifetime in seconds.
  ttl: Long,
  // Environment named by the requester; "" when none was given.
  environment: String,
  // Network address the request came from.
  source: ipaddr,
  // Time of the decision (UTC).
  time: datetime,
  // True when the requester invoked break-glass.
  break_glass: Bool,
  // The tools an agent's task declares (empty for other requests).
  tools: Set<String>,
  // The argument constraints the task declared, one tag per constrained argument,
  // named `tool:argument`: `context.constraints.hasTag("transfer:amount") &&
  // context.constraints.getTag("transfer:amount") has maximum &&
  // context.constraints.getTag("transfer:amount").maximum <= 1000`.
  constraints: ToolConstraints,
  // Hops of delegation: 0 for a workload's own request, 1 for its sub-agent's, …
  depth: Long,
  // Present only when a gate (the MCP proxy) decides one tool call:
  // `context has tool && context.tool.name == "transfer"`.
  tool?: ToolCall,
};

// A task's declared argument constraints (tags `tool:argument`).
entity ToolConstraints tags ArgConstraint;

// One declared constraint. `maximum` is set when the declared maximum is a whole
// number; `one_of` holds strings as they are and other values as compact JSON.
type ArgConstraint = {
  prefix?: String,
  one_of?: Set<String>,
  maximum?: Long,
  pattern?: String,
};

// One MCP tool call: the tool's name and its arguments.
type ToolCall = {
  name: String,
  args: ToolArgs,
};

// The arguments of one tool call, one tag per argument:
// `context.tool.args.hasTag("amount") && context.tool.args.getTag("amount") has number
//  && context.tool.args.getTag("amount").number <= 100`.
entity ToolArgs tags ToolArg;

// One argument. `text`: a string as it is, anything else as compact JSON. `number`:
// set for whole numbers; `boolean`: set for true/false.
type ToolArg = {
  text: String,
  number?: Long,
  boolean?: Bool,
};
"#;

pub const BASE_SCHEMA_NAME: &str = "<lapse base schema>";
