//! Which CONNECT targets are intercepted and which are tunnelled raw
//! (`mitm.include` / `mitm.exclude` host globs).

/// Which CONNECT targets are intercepted and which are tunnelled raw.
#[derive(Debug, Default, Clone)]
pub struct InterceptPolicy {
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
}

/// A host pattern that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("mitm host pattern {pattern:?}: {reason}")]
pub struct HostPatternError {
    pattern: String,
    reason: String,
}

impl InterceptPolicy {
    /// A policy from `mitm.include` and `mitm.exclude` globs.
    pub fn new(
        include: &[String],
        exclude: &[String],
    ) -> Result<InterceptPolicy, HostPatternError> {
        let compile = |patterns: &[String]| {
            patterns
                .iter()
                .map(|p| {
                    glob::Pattern::new(&p.to_ascii_lowercase()).map_err(|e| HostPatternError {
                        pattern: p.clone(),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(InterceptPolicy {
            include: compile(include)?,
            exclude: compile(exclude)?,
        })
    }

    /// Whether a tunnel to `host` is intercepted (else it is passed through).
    /// A fully qualified name (`www.target.example.`, with its trailing
    /// dot) is the same host to DNS and to a client's cookie jar, so it is
    /// judged as the name without the dot: a pattern that intercepts one
    /// intercepts both, and the cookies sent to either are read.
    pub fn intercepts(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let matches = |patterns: &[glob::Pattern]| patterns.iter().any(|p| p.matches(&host));
        (self.include.is_empty() || matches(&self.include)) && !matches(&self.exclude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_and_exclude() {
        let all =
            InterceptPolicy::new(&[], &["*.bank.example".into(), "pay.example".into()]).unwrap();
        assert!(all.intercepts("shop.example"));
        assert!(!all.intercepts("WWW.Bank.Example"));
        assert!(!all.intercepts("pay.example"));
        let only = InterceptPolicy::new(
            &["*.target.example".into()],
            &["login.target.example".into()],
        )
        .unwrap();
        assert!(only.intercepts("www.target.example"));
        assert!(
            only.intercepts("www.target.example."),
            "a trailing dot names the same host"
        );
        assert!(!only.intercepts("login.target.example"));
        assert!(!only.intercepts("login.target.example."));
        assert!(!only.intercepts("cdn.other.example"));
    }
}
