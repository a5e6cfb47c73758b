//! Printing an error with its causes. Each error type says what failed in
//! its own words and keeps what caused it as its `source()`, never in its
//! message (so no cause prints twice); where an error is shown, logged or
//! sent to a client, [`Chain`] prints the whole story on one line.

use std::{error::Error, fmt};

/// `e` and its causes: "what failed: why: why that".
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn every_cause_prints_once_in_order() {
        let e = Outer(Inner(std::io::Error::other("root")));
        assert_eq!(Chain(&e).to_string(), "outer: inner: root");
    }
}
