//! Password hashes of proxy users: argon2id PHC strings (what `pinproxy
//! user add` writes) or bcrypt (`htpasswd -nbB`), so an existing password
//! file can be reused. A plain password is never accepted in the
//! configuration.
//!
//! Verifying is deliberately expensive (argon2id: tens of milliseconds and
//! 19 MiB by default): callers run it off the runtime threads and cache
//! successes (see [`super::Auth`]).

use argon2::password_hash::phc::PasswordHash as Phc;
use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};

/// A password hash from the configuration, checked when it was read.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordHash {
    /// An argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
    Argon2id(String),
    /// A bcrypt hash (`$2b$12$...`, also `$2a$` and `$2y$`).
    Bcrypt(String),
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash is not the password, but it is what an offline guess
        // starts from: never printed.
        match self {
            PasswordHash::Argon2id(_) => f.write_str("PasswordHash::Argon2id(<redacted>)"),
            PasswordHash::Bcrypt(_) => f.write_str("PasswordHash::Bcrypt(<redacted>)"),
        }
    }
}

/// A `password_hash` the configuration cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordHashError {
    /// Not a hash at all (most likely a plain password).
    #[error(
        "is not a password hash; write an argon2id hash (`pinproxy user add NAME` prints one) \
         or a bcrypt hash (`htpasswd -nbB NAME PASSWORD`), never the password itself"
    )]
    NotAHash,
    /// A PHC string of another algorithm.
    #[error("uses {0}; pinproxy verifies argon2id and bcrypt hashes")]
    Algorithm(String),
    /// Looks like a hash of a known kind but does not parse.
    #[error("is a malformed {kind} hash: {reason}")]
    Malformed {
        /// argon2id or bcrypt.
        kind: &'static str,
        /// Why.
        reason: String,
    },
}

impl PasswordHash {
    /// Reads a hash from the configuration.
    pub fn parse(text: &str) -> Result<PasswordHash, PasswordHashError> {
        let text = text.trim();
        if ["$2a$", "$2b$", "$2y$"].iter().any(|p| text.starts_with(p)) {
            return text
                .parse::<bcrypt::HashParts>()
                .map(|_| PasswordHash::Bcrypt(text.to_owned()))
                .map_err(|e| PasswordHashError::Malformed {
                    kind: "bcrypt",
                    reason: e.to_string(),
                });
        }
        if !text.starts_with('$') {
            return Err(PasswordHashError::NotAHash);
        }
        let phc = Phc::new(text).map_err(|e| PasswordHashError::Malformed {
            kind: "argon2id",
            reason: e.to_string(),
        })?;
        if phc.algorithm.as_str() != argon2::ARGON2ID_IDENT.as_str() {
            return Err(PasswordHashError::Algorithm(phc.algorithm.to_string()));
        }
        // The parameters must be ones argon2 accepts, or every login would
        // fail at run time instead of here.
        argon2::Params::try_from(&phc).map_err(|e| PasswordHashError::Malformed {
            kind: "argon2id",
            reason: e.to_string(),
        })?;
        if phc.salt.is_none() || phc.hash.is_none() {
            return Err(PasswordHashError::Malformed {
                kind: "argon2id",
                reason: "it has no salt or no hash".into(),
            });
        }
        Ok(PasswordHash::Argon2id(text.to_owned()))
    }

    /// What a verification against this hash costs, as a key: hashes of
    /// one algorithm with one set of parameters (argon2id's `m`, `t`, `p`;
    /// bcrypt's cost) take the same time whatever the password.
    pub fn cost_class(&self) -> &str {
        let (text, salt_field) = match self {
            // `$argon2id$v=19$m=..,t=..,p=..$salt$hash`: the salt's `$` is
            // the fourth.
            PasswordHash::Argon2id(text) => (text, 3),
            // `$2b$12$salthash`: the third.
            PasswordHash::Bcrypt(text) => (text, 2),
        };
        let end = text
            .match_indices('$')
            .nth(salt_field)
            .map_or(text.len(), |(i, _)| i);
        &text[..end]
    }

    /// Whether `password` matches. Expensive and blocking: call it off the
    /// runtime threads.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Argon2id(text) => Phc::new(text)
                .map(|phc| Argon2::default().verify_password(password, &phc).is_ok())
                .unwrap_or(false),
            PasswordHash::Bcrypt(text) => bcrypt::verify(password, text).unwrap_or(false),
        }
    }
}

/// Hashes `password` with argon2id (the argon2 crate's defaults, OWASP's
/// recommendation: m=19 MiB, t=2, p=1) and a random salt, as a PHC string.
pub fn hash_argon2id(password: &[u8]) -> Result<String, String> {
    Argon2::default()
        .hash_password(password)
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_hashes_round_trip() {
        let text = hash_argon2id(b"correct horse").unwrap();
        assert!(text.starts_with("$argon2id$"), "{text}");
        let hash = PasswordHash::parse(&text).unwrap();
        assert!(hash.verify(b"correct horse"));
        assert!(!hash.verify(b"correct horsf"));
        assert!(!format!("{hash:?}").contains(&text));
    }

    /// Hashes with one algorithm and one set of parameters share a cost
    /// class, whatever their salt; other parameters make another.
    #[test]
    fn cost_classes_follow_algorithm_and_parameters() {
        let class = |text: &str| PasswordHash::parse(text).unwrap().cost_class().to_owned();
        let one = class(&hash_argon2id(b"a").unwrap());
        assert_eq!(one, class(&hash_argon2id(b"b").unwrap()));
        assert_eq!(one, "$argon2id$v=19$m=19456,t=2,p=1");
        let four = class(&bcrypt::hash("a", 4).unwrap());
        assert_eq!(four, class(&bcrypt::hash("b", 4).unwrap()));
        assert_ne!(four, class(&bcrypt::hash("a", 5).unwrap()));
        assert_ne!(four, one);
    }

    #[test]
    fn bcrypt_hashes_are_verified() {
        let text = bcrypt::hash("pw", 4).unwrap();
        let hash = PasswordHash::parse(&text).unwrap();
        assert!(hash.verify(b"pw"));
        assert!(!hash.verify(b"pW"));
    }

    #[test]
    fn plain_passwords_and_other_algorithms_are_refused() {
        assert_eq!(
            PasswordHash::parse("hunter2"),
            Err(PasswordHashError::NotAHash)
        );
        assert!(matches!(
            PasswordHash::parse("$argon2i$v=19$m=4096,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"),
            Err(PasswordHashError::Algorithm(_))
        ));
        assert!(matches!(
            PasswordHash::parse("$2b$12$short"),
            Err(PasswordHashError::Malformed { .. })
        ));
        assert!(matches!(
            PasswordHash::parse("$argon2id$v=19$garbage"),
            Err(PasswordHashError::Malformed { .. })
        ));
    }
}
