//! A validated, indexed policy set, and the decision function over it.

use crate::error::{PolicyError, first_offset, line_col, message};
use crate::index::PolicyIndex;
use crate::schema::{BASE_SCHEMA, BASE_SCHEMA_NAME};
use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Effect, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, Request, RestrictedExpression, Schema,
    SchemaFragment, ValidationMode, Validator,
};
use lapse_core::{AccessRequest, Decision, DecisionOutcome, TtlDuration};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::str::FromStr;

/// One file of a policy folder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// What Lapse knows about one policy beyond its Cedar text.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyInfo {
    pub id: String,
    pub file: String,
    pub effect: &'static str,
    /// `@max_ttl`, in seconds.
    pub max_ttl_secs: Option<u64>,
    /// `@idle`: a grant unused (per gates' use reports) this long is revoked.
    pub idle_secs: Option<u64>,
    /// `@approval`: how many distinct people must approve.
    pub approvals: u32,
    /// `@approvers`: the group allowed to approve.
    pub approvers: Option<String>,
    /// `@break_glass("true")`: this permit decides break-glass requests only.
    pub break_glass: bool,
}

/// A loaded policy folder. Immutable: a reload builds a new bundle and swaps it in.
pub struct PolicyBundle {
    /// Unique in this process: inputs built by another bundle are never reused.
    id: u64,
    schema_text: String,
    info: HashMap<String, PolicyInfo>,
    index: PolicyIndex,
    /// Each action's entity, its groups already closed transitively by the schema:
    /// a request needs only its own actions', not a copy of every action's.
    action_entities: HashMap<String, Entity>,
    actions: Vec<String>,
    authorizer: Authorizer,
    workload_type: EntityTypeName,
    resource_type: EntityTypeName,
    action_type: EntityTypeName,
    args_type: EntityTypeName,
    constraints_type: EntityTypeName,
    /// Number of policies, for logs and metrics.
    pub policy_count: usize,
    /// The files it was built from, so gates can build the same bundle.
    sources: Vec<SourceFile>,
}

impl std::fmt::Debug for PolicyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyBundle")
            .field("policy_count", &self.policy_count)
            .field("actions", &self.actions)
            .finish_non_exhaustive()
    }
}

const KNOWN_ANNOTATIONS: &[&str] = &[
    "id",
    "max_ttl",
    "idle",
    "approval",
    "approvers",
    "break_glass",
    "description",
];

impl PolicyBundle {
    /// Reads every `*.cedar` and `*.cedarschema` file of `dir` (not recursive), in name order.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let io = |source| PolicyError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            if ext != "cedar" && ext != "cedarschema" {
                continue;
            }
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Io {
                path: path.clone(),
                source,
            })?;
            files.push(SourceFile { name, text });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        if !files.iter().any(|f| f.name.ends_with(".cedar")) {
            return Err(PolicyError::Empty(dir.display().to_string()));
        }
        Self::from_sources(&files)
    }

    /// Builds a bundle from in-memory sources: schema fragments end in `.cedarschema`,
    /// policies in `.cedar`.
    pub fn from_sources(files: &[SourceFile]) -> Result<Self, PolicyError> {
        Self::build(files, true)
    }

    /// Like [`from_sources`](Self::from_sources) but without the action/resource
    /// index: every decision evaluates every policy of its break-glass class. It
    /// exists so tests can show the index never changes a decision and benchmarks
    /// can measure what it saves; the server never uses it.
    pub fn from_sources_unindexed(files: &[SourceFile]) -> Result<Self, PolicyError> {
        Self::build(files, false)
    }

    fn build(files: &[SourceFile], indexed: bool) -> Result<Self, PolicyError> {
        let (schema, schema_text) = schema_of(files)?;

        // Parse each policy file on its own so that offsets in errors are offsets
        // into that file, then give each policy a stable, readable id.
        let mut all = PolicySet::new();
        let mut file_of: HashMap<String, (String, String)> = HashMap::new(); // id -> (file, text)
        let mut policies: Vec<(Policy, PolicyInfo)> = Vec::new();
        for f in files.iter().filter(|f| f.name.ends_with(".cedar")) {
            let parsed = PolicySet::from_str(&f.text).map_err(|e| {
                let (line, column) = first_offset(&e).map_or((1, 1), |o| line_col(&f.text, o));
                PolicyError::Syntax {
                    file: f.name.clone(),
                    line,
                    column,
                    message: message(&e),
                }
            })?;
            if parsed.templates().next().is_some() {
                return Err(PolicyError::Syntax {
                    file: f.name.clone(),
                    line: 1,
                    column: 1,
                    message: "policy templates are not supported; write static policies".into(),
                });
            }
            // `policies()` iterates in an unspecified order; policy0, policy1… follow
            // the file, so sort by that number.
            let mut in_file: Vec<&Policy> = parsed.policies().collect();
            in_file.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(usize::MAX)
            });
            for (n, p) in in_file.into_iter().enumerate() {
                let id = p
                    .annotation("id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{}#{}", f.name, n + 1));
                if let Some((other, _)) = file_of.get(&id) {
                    return Err(PolicyError::DuplicateId {
                        file: f.name.clone(),
                        policy: id,
                        other: other.clone(),
                    });
                }
                let policy = p.new_id(PolicyId::new(&id));
                let info = annotations(&policy, &id, f)?;
                all.add(policy.clone()).map_err(|e| PolicyError::Syntax {
                    file: f.name.clone(),
                    line: 1,
                    column: 1,
                    message: e.to_string(),
                })?;
                file_of.insert(id, (f.name.clone(), f.text.clone()));
                policies.push((policy, info));
            }
        }

        let result = Validator::new(schema.clone()).validate(&all, ValidationMode::Strict);
        if let Some(err) = result.validation_errors().next() {
            let policy = err.policy_id().to_string();
            let (file, text) = file_of.get(&policy).cloned().unwrap_or_default();
            let (line, column) = first_offset(err).map_or((1, 1), |o| line_col(&text, o));
            return Err(PolicyError::Validation {
                file,
                line,
                column,
                policy,
                message: message(err),
            });
        }

        let action_entities = schema.action_entities().map_err(|e| PolicyError::Schema {
            file: "schema".into(),
            message: e.to_string(),
        })?;
        let action_uids: Vec<EntityUid> = schema.actions().cloned().collect();
        let with_class: Vec<(Policy, bool)> = policies
            .iter()
            .map(|(p, i)| (p.clone(), i.break_glass))
            .collect();
        let index = PolicyIndex::build(&with_class, &action_uids, &action_entities, indexed)
            .map_err(|e| PolicyError::Schema {
                file: "policies".into(),
                message: e.to_string(),
            })?;
        let mut actions: Vec<String> = action_uids
            .iter()
            .map(|a| a.id().unescaped().to_owned())
            .collect();
        actions.sort();
        let type_name = |s: &str| {
            EntityTypeName::from_str(s).map_err(|e| PolicyError::Schema {
                file: BASE_SCHEMA_NAME.into(),
                message: e.to_string(),
            })
        };
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            workload_type: type_name("Workload")?,
            resource_type: type_name("Resource")?,
            action_type: type_name("Action")?,
            args_type: type_name("ToolArgs")?,
            constraints_type: type_name("ToolConstraints")?,
            schema_text,
            policy_count: policies.len(),
            info: policies
                .into_iter()
                .map(|(_, i)| (i.id.clone(), i))
                .collect(),
            index,
            action_entities: action_uids
                .iter()
                .filter_map(|uid| {
                    let e = action_entities.get(uid)?.clone();
                    Some((uid.id().unescaped().to_owned(), e))
                })
                .collect(),
            actions,
            authorizer: Authorizer::new(),
            sources: files.to_vec(),
        })
    }

    /// Actions declared by the schema, sorted.
    /// The tightest `@idle` among `policies` (the permits that decided a grant).
    pub fn idle_secs(&self, policies: &[String]) -> Option<u64> {
        policies
            .iter()
            .filter_map(|id| self.info.get(id).and_then(|i| i.idle_secs))
            .min()
    }

    /// The files this bundle was built from, in name order.
    pub fn sources(&self) -> &[SourceFile] {
        &self.sources
    }

    pub fn actions(&self) -> &[String] {
        &self.actions
    }

    pub fn has_action(&self, action: &str) -> bool {
        self.actions
            .binary_search_by(|a| a.as_str().cmp(action))
            .is_ok()
    }

    /// The merged schema as Cedar schema text (base plus fragments).
    pub fn schema_text(&self) -> &str {
        &self.schema_text
    }

    pub fn policy(&self, id: &str) -> Option<&PolicyInfo> {
        self.info.get(id)
    }

    pub fn policies(&self) -> impl Iterator<Item = &PolicyInfo> {
        self.info.values()
    }

    /// Decides `request` now (the request carries the decision time).
    ///
    /// Every requested action must be allowed for the request to be allowed; the
    /// TTL cap is the tightest `@max_ttl` among the permits that allowed it, and the
    /// approvals required the highest `@approval`. A policy that fails to evaluate
    /// makes the decision a deny: anything uncertain fails closed.
    pub fn decide(&self, request: &AccessRequest) -> Decision {
        if request.actions.is_empty() {
            return Decision::deny("no actions requested", vec![]);
        }
        let inputs = match self.inputs(request) {
            Ok(i) => i,
            Err(d) => return d,
        };
        // Cedar's answer is a function of the policies and the inputs alone, so
        // the same request to the same bundle has the same decision.
        if let Some(d) = inputs.decision.get() {
            return d.clone();
        }
        let d = self.evaluate(request, &inputs);
        let _ = inputs.decision.set(d.clone());
        d
    }

    fn evaluate(&self, request: &AccessRequest, inputs: &Inputs) -> Decision {
        let (entities, context) = (&inputs.entities, &inputs.context);
        let principal = EntityUid::from_type_name_and_id(
            self.workload_type.clone(),
            EntityId::new(&request.workload.id),
        );
        let resource = EntityUid::from_type_name_and_id(
            self.resource_type.clone(),
            EntityId::new(&request.audience),
        );
        let break_glass = request.context.break_glass;

        let mut determining: Vec<String> = Vec::new();
        let mut cap: Option<u64> = None;
        let mut approvals: u32 = 0;
        let mut approvers: Option<String> = None;
        for action in &request.actions {
            let Some(set) = self.index.lookup(action, &request.audience, break_glass) else {
                return Decision::deny(format!("unknown action `{action}`"), vec![]);
            };
            let action_uid =
                EntityUid::from_type_name_and_id(self.action_type.clone(), EntityId::new(action));
            let cedar_request = match Request::new(
                principal.clone(),
                action_uid,
                resource.clone(),
                context.clone(),
                None,
            ) {
                Ok(r) => r,
                Err(e) => return Decision::deny(format!("invalid policy request: {e}"), vec![]),
            };
            let response = self.authorizer.is_authorized(&cedar_request, set, entities);
            let diag = response.diagnostics();
            // Cedar's reason set has no order; sort so a decision (and its audit
            // record) is the same however the policies were grouped.
            let mut reasons: Vec<String> = diag.reason().map(ToString::to_string).collect();
            reasons.sort();
            if let Some(cedar_policy::AuthorizationError::PolicyEvaluationError(err)) =
                diag.errors().next()
            {
                return Decision::deny(
                    format!(
                        "policy `{}` failed to evaluate for `{action}`: failing closed",
                        err.policy_id()
                    ),
                    vec![err.policy_id().to_string()],
                );
            }
            match response.decision() {
                CedarDecision::Deny => {
                    let msg = if reasons.is_empty() {
                        if break_glass {
                            format!(
                                "no break-glass policy permits `{action}` on `{}`",
                                request.audience
                            )
                        } else {
                            format!("no policy permits `{action}` on `{}`", request.audience)
                        }
                    } else {
                        format!(
                            "`{action}` on `{}` is forbidden by {}",
                            request.audience,
                            quoted(&reasons)
                        )
                    };
                    return Decision::deny(msg, reasons);
                }
                CedarDecision::Allow => {
                    for id in &reasons {
                        if let Some(info) = self.info.get(id) {
                            if let Some(t) = info.max_ttl_secs {
                                cap = Some(cap.map_or(t, |c| c.min(t)));
                            }
                            if info.approvals > approvals {
                                approvals = info.approvals;
                                approvers = info.approvers.clone();
                            }
                        }
                        if !determining.contains(id) {
                            determining.push(id.clone());
                        }
                    }
                }
            }
        }
        determining.sort();
        let outcome = if approvals > 0 {
            DecisionOutcome::ApprovalRequired {
                approvals,
                ttl_cap_secs: cap,
                approvers,
            }
        } else {
            DecisionOutcome::Allow { ttl_cap_secs: cap }
        };
        Decision {
            outcome,
            policies: determining,
        }
    }

    /// Cedar's entities and context for `request` (and, once made, the decision):
    /// built, or the ones this thread built before for the same request to this
    /// bundle. Building them is most of a decision's policy time (Cedar evaluates
    /// every attribute), and a gate sees each busy token's requests many times a
    /// second, interleaved with other tokens'. The map is looked up by a hash of
    /// the fields that tell requests apart most cheaply, and an entry is used only
    /// if its whole request is equal, so anything that differs (even the second)
    /// builds afresh.
    fn inputs(&self, request: &AccessRequest) -> Result<Rc<Inputs>, Decision> {
        let key = inputs_key(self.id, request);
        let hit = INPUTS.with(|m| {
            m.borrow()
                .by_key
                .get(&key)
                .filter(|i| i.bundle == self.id && i.request == *request)
                .cloned()
        });
        if let Some(i) = hit {
            return Ok(i);
        }
        let entities = self
            .entities(request)
            .map_err(|msg| Decision::deny(format!("cannot build policy input: {msg}"), vec![]))?;
        let context = context(request, &self.args_type, &self.constraints_type)
            .map_err(|msg| Decision::deny(format!("cannot build policy context: {msg}"), vec![]))?;
        let i = Rc::new(Inputs {
            bundle: self.id,
            request: request.clone(),
            entities,
            context,
            decision: std::cell::OnceCell::new(),
        });
        INPUTS.with(|m| {
            let mut m = m.borrow_mut();
            // A request of another time makes every kept one useless (their times
            // differ from every request to come); a full map keeps what it has.
            if m.time != Some(request.context.time) {
                m.by_key.clear();
                m.time = Some(request.context.time);
            }
            if m.by_key.len() < INPUTS_CAP {
                m.by_key.insert(key, Rc::clone(&i));
            }
        });
        Ok(i)
    }

    fn entities(&self, request: &AccessRequest) -> Result<Entities, String> {
        let w = &request.workload;
        let workload = Entity::new_with_tags(
            EntityUid::from_type_name_and_id(self.workload_type.clone(), EntityId::new(&w.id)),
            [
                (
                    "uri".to_owned(),
                    RestrictedExpression::new_string(w.id.clone()),
                ),
                (
                    "issuer".to_owned(),
                    RestrictedExpression::new_string(w.issuer.clone()),
                ),
                (
                    "subject".to_owned(),
                    RestrictedExpression::new_string(w.subject.clone()),
                ),
            ],
            [],
            w.claims
                .iter()
                .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone()))),
        )
        .map_err(|e| e.to_string())?;
        let resource = Entity::new_no_attrs(
            EntityUid::from_type_name_and_id(
                self.resource_type.clone(),
                EntityId::new(&request.audience),
            ),
            Default::default(),
        );
        let declared = Entity::new_with_tags(
            EntityUid::from_type_name_and_id(
                self.constraints_type.clone(),
                EntityId::new("declared"),
            ),
            [],
            [],
            request.tools.iter().flat_map(|t| {
                t.args
                    .iter()
                    .map(move |(arg, c)| (format!("{}:{arg}", t.name), arg_constraint(c)))
            }),
        )
        .map_err(|e| e.to_string())?;
        let mut all = vec![workload, resource, declared];
        if let Some(call) = &request.context.tool {
            all.push(
                Entity::new_with_tags(
                    EntityUid::from_type_name_and_id(self.args_type.clone(), EntityId::new("call")),
                    [],
                    [],
                    call.args.iter().map(|(k, v)| (k.clone(), tool_arg(v))),
                )
                .map_err(|e| e.to_string())?,
            );
        }
        let mut added: Vec<&str> = Vec::with_capacity(request.actions.len());
        for action in &request.actions {
            // An unknown action is denied by the caller; a repeated one is added once.
            if !added.contains(&action.as_str())
                && let Some(e) = self.action_entities.get(action)
            {
                added.push(action);
                all.push(e.clone());
            }
        }
        Entities::from_entities(all, None).map_err(|e| e.to_string())
    }
}

/// The schema: Lapse's base schema with every `.cedarschema` file added, and its
/// text as shown to operators (each file under a header naming it).
fn schema_of(files: &[SourceFile]) -> Result<(Schema, String), PolicyError> {
    let mut fragments = Vec::new();
    let mut schema_text = String::from(BASE_SCHEMA);
    let base = SchemaFragment::from_cedarschema_str(BASE_SCHEMA)
        .map_err(|e| PolicyError::Schema {
            file: BASE_SCHEMA_NAME.into(),
            message: message(&e),
        })?
        .0;
    fragments.push(base);
    for f in files.iter().filter(|f| f.name.ends_with(".cedarschema")) {
        let frag = SchemaFragment::from_cedarschema_str(&f.text).map_err(|e| {
            let (line, column) = first_offset(&e).map_or((1, 1), |o| line_col(&f.text, o));
            PolicyError::Syntax {
                file: f.name.clone(),
                line,
                column,
                message: message(&e),
            }
        })?;
        fragments.push(frag.0);
        schema_text.push_str(&format!("\n// ---- {} ----\n{}", f.name, f.text));
    }
    let schema = Schema::from_schema_fragments(fragments).map_err(|e| PolicyError::Schema {
        file: "schema".into(),
        message: message(&e),
    })?;
    Ok((schema, schema_text))
}

/// One tool-call argument as a `ToolArg` record.
fn tool_arg(v: &serde_json::Value) -> RestrictedExpression {
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut fields = vec![("text".to_owned(), RestrictedExpression::new_string(text))];
    if let Some(n) = v.as_i64() {
        fields.push(("number".to_owned(), RestrictedExpression::new_long(n)));
    } else if let Some(f) = v.as_f64()
        && f.fract() == 0.0
        && f.abs() < 9.0e15
    {
        // A whole number written as 5.0; the bound keeps the cast exact.
        #[allow(clippy::cast_possible_truncation)]
        fields.push((
            "number".to_owned(),
            RestrictedExpression::new_long(f as i64),
        ));
    }
    if let Some(b) = v.as_bool() {
        fields.push(("boolean".to_owned(), RestrictedExpression::new_bool(b)));
    }
    // Field names are distinct literals, so building the record cannot fail.
    RestrictedExpression::new_record(fields)
        .unwrap_or_else(|_| RestrictedExpression::new_string(String::new()))
}

/// One declared constraint as an `ArgConstraint` record.
fn arg_constraint(c: &lapse_core::tools::ArgConstraint) -> RestrictedExpression {
    let mut fields = Vec::new();
    if let Some(p) = &c.prefix {
        fields.push((
            "prefix".to_owned(),
            RestrictedExpression::new_string(p.clone()),
        ));
    }
    if let Some(set) = &c.one_of {
        fields.push((
            "one_of".to_owned(),
            RestrictedExpression::new_set(set.iter().map(|v| {
                RestrictedExpression::new_string(match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            })),
        ));
    }
    if let Some(m) = c.maximum
        && m.fract() == 0.0
        && m.abs() < 9.0e15
    {
        // A whole number; the bound keeps the cast exact.
        #[allow(clippy::cast_possible_truncation)]
        fields.push((
            "maximum".to_owned(),
            RestrictedExpression::new_long(m as i64),
        ));
    }
    if let Some(p) = &c.pattern {
        fields.push((
            "pattern".to_owned(),
            RestrictedExpression::new_string(p.clone()),
        ));
    }
    // Field names are distinct literals, so building the record cannot fail.
    RestrictedExpression::new_record(fields)
        .unwrap_or_else(|_| RestrictedExpression::new_string(String::new()))
}

/// What [`PolicyBundle::decide`] hands Cedar for one request.
struct Inputs {
    /// [`PolicyBundle::id`] of the bundle they were built by.
    bundle: u64,
    request: AccessRequest,
    entities: Entities,
    context: Context,
    /// The decision for `request`, once made.
    decision: std::cell::OnceCell<Decision>,
}

type Memo<K> = std::cell::RefCell<HashMap<K, RestrictedExpression>>;

/// Entries a thread keeps per memo before it starts over.
const MEMO_CAP: usize = 1024;

/// Policy inputs a thread keeps for one request time. Each is about 20 KiB (Cedar's
/// entities and context; BENCHMARKS.md), so at most about 5 MiB per thread; a gate
/// thread serving up to this many busy grants builds each grant's once a second,
/// and beyond that the first this many of each second.
const INPUTS_CAP: usize = 256;

/// Where a request's inputs are looked for; equal requests have equal keys.
fn inputs_key(bundle: u64, r: &AccessRequest) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bundle.hash(&mut h);
    r.workload.id.hash(&mut h);
    r.task.id.hash(&mut h);
    r.audience.hash(&mut h);
    r.actions.hash(&mut h);
    r.context.time.hash(&mut h);
    r.context.source.hash(&mut h);
    h.finish()
}

/// A thread's kept policy inputs: all of one request time (the gate's is the second).
#[derive(Default)]
struct InputsMemo {
    time: Option<lapse_core::Timestamp>,
    by_key: HashMap<u64, Rc<Inputs>>,
}

thread_local! {
    static INPUTS: std::cell::RefCell<InputsMemo> = std::cell::RefCell::new(InputsMemo::default());
    // Cedar's `new_ip` and `new_datetime` parse their extension's name with its
    // grammar on every call: a third of a gate's policy time. A gate's thread sees
    // the same client addresses and the same second request after request.
    static IPS: Memo<std::net::IpAddr> = std::cell::RefCell::new(HashMap::new());
    static TIMES: Memo<lapse_core::Timestamp> = std::cell::RefCell::new(HashMap::new());
}

/// `make()`, or the expression this thread made before for the same `key`.
fn memo<K: std::hash::Hash + Eq + Clone + 'static>(
    cell: &'static std::thread::LocalKey<Memo<K>>,
    key: &K,
    make: impl FnOnce() -> RestrictedExpression,
) -> RestrictedExpression {
    cell.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(e) = m.get(key) {
            return e.clone();
        }
        if m.len() >= MEMO_CAP {
            m.clear();
        }
        let e = make();
        m.insert(key.clone(), e.clone());
        e
    })
}

fn context(
    request: &AccessRequest,
    args_type: &EntityTypeName,
    constraints_type: &EntityTypeName,
) -> Result<Context, String> {
    let c = &request.context;
    let ttl = i64::try_from(request.requested_ttl_secs).unwrap_or(i64::MAX);
    let tools = RestrictedExpression::new_set(
        request
            .tools
            .iter()
            .map(|t| RestrictedExpression::new_string(t.name.clone())),
    );
    let tool = match &c.tool {
        None => None,
        Some(call) => Some((
            "tool".to_owned(),
            RestrictedExpression::new_record([
                (
                    "name".to_owned(),
                    RestrictedExpression::new_string(call.name.clone()),
                ),
                (
                    "args".to_owned(),
                    RestrictedExpression::new_entity_uid(EntityUid::from_type_name_and_id(
                        args_type.clone(),
                        EntityId::new("call"),
                    )),
                ),
            ])
            .map_err(|e| e.to_string())?,
        )),
    };
    Context::from_pairs(
        [
            ("tools".to_owned(), tools),
            (
                "constraints".to_owned(),
                RestrictedExpression::new_entity_uid(EntityUid::from_type_name_and_id(
                    constraints_type.clone(),
                    EntityId::new("declared"),
                )),
            ),
            (
                "depth".to_owned(),
                RestrictedExpression::new_long(i64::from(c.depth)),
            ),
            (
                "task".to_owned(),
                RestrictedExpression::new_string(request.task.id.clone()),
            ),
            (
                "purpose".to_owned(),
                RestrictedExpression::new_string(request.task.purpose.clone()),
            ),
            (
                "ticket".to_owned(),
                RestrictedExpression::new_string(request.task.ticket.clone()),
            ),
            ("ttl".to_owned(), RestrictedExpression::new_long(ttl)),
            (
                "environment".to_owned(),
                RestrictedExpression::new_string(c.environment.clone()),
            ),
            (
                "source".to_owned(),
                memo(&IPS, &c.source, || {
                    RestrictedExpression::new_ip(c.source.to_string())
                }),
            ),
            (
                "time".to_owned(),
                memo(&TIMES, &c.time, || {
                    RestrictedExpression::new_datetime(c.time.rfc3339())
                }),
            ),
            (
                "break_glass".to_owned(),
                RestrictedExpression::new_bool(c.break_glass),
            ),
        ]
        .into_iter()
        .chain(tool),
    )
    .map_err(|e| e.to_string())
}

fn quoted(ids: &[String]) -> String {
    ids.iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads and checks Lapse's annotations on one policy.
fn annotations(policy: &Policy, id: &str, file: &SourceFile) -> Result<PolicyInfo, PolicyError> {
    let bad = |key: &str, value: &str, why: String| PolicyError::Annotation {
        file: file.name.clone(),
        line: annotation_line(&file.text, key, value),
        policy: id.to_owned(),
        message: why,
    };
    let mut info = PolicyInfo {
        id: id.to_owned(),
        file: file.name.clone(),
        effect: match policy.effect() {
            Effect::Permit => "permit",
            Effect::Forbid => "forbid",
        },
        max_ttl_secs: None,
        idle_secs: None,
        approvals: 0,
        approvers: None,
        break_glass: false,
    };
    let all: BTreeMap<&str, &str> = policy.annotations().collect();
    for (key, value) in &all {
        if !KNOWN_ANNOTATIONS.contains(key) {
            return Err(bad(
                key,
                value,
                format!(
                    "unknown annotation `@{key}`; known: {}",
                    KNOWN_ANNOTATIONS.join(", ")
                ),
            ));
        }
    }
    let permit_only = |key: &str, value: &str| {
        if policy.effect() == Effect::Forbid {
            Err(bad(
                key,
                value,
                format!("`@{key}` only applies to permit policies"),
            ))
        } else {
            Ok(())
        }
    };
    if let Some(v) = all.get("max_ttl") {
        permit_only("max_ttl", v)?;
        let d: TtlDuration = v
            .parse()
            .map_err(|e: lapse_core::DurationParseError| bad("max_ttl", v, e.to_string()))?;
        if d.secs() == 0 {
            return Err(bad(
                "max_ttl",
                v,
                "`@max_ttl` must be longer than zero".into(),
            ));
        }
        info.max_ttl_secs = Some(d.secs());
    }
    if let Some(v) = all.get("idle") {
        permit_only("idle", v)?;
        let d: TtlDuration = v
            .parse()
            .map_err(|e: lapse_core::DurationParseError| bad("idle", v, e.to_string()))?;
        if d.secs() == 0 {
            return Err(bad("idle", v, "`@idle` must be longer than zero".into()));
        }
        info.idle_secs = Some(d.secs());
    }
    if let Some(v) = all.get("approval") {
        permit_only("approval", v)?;
        let n: u32 = v
            .parse()
            .ok()
            .filter(|n| (1..=10).contains(n))
            .ok_or_else(|| {
                bad(
                    "approval",
                    v,
                    format!("`@approval(\"{v}\")` must be a whole number from 1 to 10"),
                )
            })?;
        info.approvals = n;
    }
    if let Some(v) = all.get("approvers") {
        permit_only("approvers", v)?;
        if v.trim().is_empty() {
            return Err(bad(
                "approvers",
                v,
                "`@approvers` names a group and cannot be empty".into(),
            ));
        }
        info.approvers = Some((*v).to_owned());
    }
    if let Some(v) = all.get("break_glass") {
        permit_only("break_glass", v)?;
        info.break_glass = match *v {
            "true" => true,
            "false" => false,
            _ => {
                return Err(bad(
                    "break_glass",
                    v,
                    format!("`@break_glass(\"{v}\")` must be \"true\" or \"false\""),
                ));
            }
        };
    }
    Ok(info)
}

/// The line where `@key("value")` is written, for error messages (1 when not found).
fn annotation_line(text: &str, key: &str, value: &str) -> usize {
    let needle = format!("@{key}");
    text.lines()
        .position(|l| l.contains(&needle) && l.contains(value))
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn request(workload: &str, task: &str) -> AccessRequest {
        AccessRequest {
            workload: lapse_core::WorkloadIdentity {
                id: workload.into(),
                issuer: "https://issuer.test".into(),
                subject: workload.into(),
                claims: BTreeMap::new(),
            },
            task: lapse_core::Task {
                id: task.into(),
                purpose: "test".into(),
                ticket: String::new(),
            },
            audience: "orders-db".into(),
            actions: vec!["read".into()],
            requested_ttl_secs: 600,
            context: lapse_core::RequestContext {
                environment: String::new(),
                source: std::net::IpAddr::from([10, 0, 0, 1]),
                time: lapse_core::Timestamp::from_unix_seconds(1_795_000_000),
                break_glass: false,
                depth: 0,
                tool: None,
            },
            tools: Vec::new(),
        }
    }

    /// Interleaved requests keep their inputs (a gate serves many grants at once),
    /// and a thread seeing ever new requests keeps at most `INPUTS_CAP` of them.
    #[test]
    fn policy_inputs_are_kept_per_request_and_bounded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policies");
        let b = PolicyBundle::load_dir(&dir).expect("the example policies load");
        let (one, two) = (
            request("spiffe://t/a", "T-1"),
            request("spiffe://t/b", "T-1"),
        );
        let first = b.inputs(&one).expect("inputs");
        let other = b.inputs(&two).expect("inputs");
        assert!(!Rc::ptr_eq(&first, &other));
        assert!(Rc::ptr_eq(&first, &b.inputs(&one).expect("inputs")));
        assert!(Rc::ptr_eq(&other, &b.inputs(&two).expect("inputs")));
        for i in 0..(INPUTS_CAP + 10) {
            let r = request("spiffe://t/a", &format!("T-{i}"));
            let made = b.inputs(&r).expect("inputs");
            assert_eq!(made.request, r);
            assert!(INPUTS.with(|m| m.borrow().by_key.len()) <= INPUTS_CAP);
        }
    }

    /// The memo gives each address its own expression, and a thread seeing ever
    /// new addresses keeps at most `MEMO_CAP` of them.
    #[test]
    fn the_address_memo_is_right_and_bounded() {
        for round in 0..3u32 {
            for i in 0..(MEMO_CAP as u32 + 10) {
                let ip = std::net::IpAddr::from((round << 24 | i).to_be_bytes());
                let e = memo(&IPS, &ip, || RestrictedExpression::new_ip(ip.to_string()));
                let again = memo(&IPS, &ip, || panic!("{ip} was just made"));
                let (e, again) = (format!("{e:?}"), format!("{again:?}"));
                assert_eq!(e, again);
                assert!(e.contains(&format!("{ip:?}")), "{e} for {ip}");
                assert!(IPS.with(|m| m.borrow().len()) <= MEMO_CAP);
            }
        }
    }
}
