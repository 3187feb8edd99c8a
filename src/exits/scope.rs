//! Which exits a client may use. Without client authentication every
//! client may use every exit; an authenticated user may be limited to some
//! (`[[auth.users]] exits`). Rotation and new identities then stay within
//! them, and an identity on another exit is refused, never moved.

use std::sync::Arc;

use crate::identity::ExitId;

/// The exits a request may leave through, and whose limit it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitScope {
    /// `None`: every exit.
    allowed: Option<Arc<[ExitId]>>,
    /// The user the limit belongs to (for error messages).
    user: Option<Arc<str>>,
}

impl ExitScope {
    /// Every exit.
    pub fn all() -> ExitScope {
        ExitScope::default()
    }

    /// Only `exits`, the limit of user `user`.
    pub fn only(user: &str, exits: Vec<ExitId>) -> ExitScope {
        ExitScope {
            allowed: Some(exits.into()),
            user: Some(user.into()),
        }
    }

    /// Whether exit `id` may be used.
    pub fn allows(&self, id: &ExitId) -> bool {
        self.allowed
            .as_ref()
            .is_none_or(|allowed| allowed.contains(id))
    }

    /// The exits allowed, `None` for all.
    pub fn exits(&self) -> Option<&[ExitId]> {
        self.allowed.as_deref()
    }

    /// The user the limit belongs to, if it is a user's.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The allowed exits in words (`res1, dc1`, or `every exit`).
    pub fn describe(&self) -> String {
        match &self.allowed {
            None => "every exit".to_owned(),
            Some(ids) => ids
                .iter()
                .map(ExitId::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_allow_what_they_list() {
        let all = ExitScope::all();
        assert!(all.allows(&ExitId::new("x")));
        let some = ExitScope::only("alice", vec![ExitId::new("a"), ExitId::new("b")]);
        assert!(some.allows(&ExitId::new("b")));
        assert!(!some.allows(&ExitId::new("c")));
        assert_eq!(some.describe(), "a, b");
        assert_eq!(some.user(), Some("alice"));
    }
}
