//! How a command fails: the exit code and the message that says why (the codes
//! are listed in the crate docs).

#[derive(Debug)]
pub(crate) struct Fail(pub(crate) u8, pub(crate) String);

pub(crate) type Out = Result<(), Fail>;

pub(crate) fn fail(code: u8, msg: impl Into<String>) -> Fail {
    Fail(code, msg.into())
}
