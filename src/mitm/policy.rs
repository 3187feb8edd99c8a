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
                    let refused = |reason: String| HostPatternError {
                        pattern: p.clone(),
                        reason,
                    };
                    // Hosts arrive in ASCII (an IDN as its `xn--` form): a
                    // pattern in Unicode would never match, and an exclude
                    // that never matches intercepts what it names.
                    if !p.is_ascii() {
                        return Err(refused(
                            "write internationalised names in their ASCII form (xn--...), as clients send them".into(),
                        ));
                    }
                    // Judged as hosts are, without a trailing dot; but not
                    // `*.`, which would become `*`, every host.
                    let text = p.strip_suffix('.').unwrap_or(p).to_ascii_lowercase();
                    if text == "*" && p != "*" {
                        return Err(refused(
                            "a lone * with a trailing dot would match every host; write * if that is meant".into(),
                        ));
                    }
                    // An IPv6 address is kept as hosts are judged: without
                    // the brackets a URL gives it (a glob reads `[...]` as
                    // a class of characters, so an exclude written so
                    // would intercept the address), in canonical form
                    // (`2001:db8::1`, not `2001:0db8:0::1`).
                    let unbracketed = text
                        .strip_prefix('[')
                        .and_then(|t| t.strip_suffix(']'))
                        .unwrap_or(&text);
                    let text = match unbracketed.parse::<std::net::Ipv6Addr>() {
                        Ok(address) => glob::Pattern::escape(&canonical_ip(address.into())),
                        Err(_) => text,
                    };
                    glob::Pattern::new(&text).map_err(|e| refused(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(InterceptPolicy {
            include: compile(include)?,
            exclude: compile(exclude)?,
        })
    }

    /// Whether the policy names the hosts it intercepts (a non-empty
    /// `mitm.include`): then a tunnel passed through carries a host the
    /// operator did not list, and one whose TLS names a listed host is
    /// refused (see `front::passthrough`). Under `mitm.exclude` alone, the
    /// operator listed what to leave alone (hosts, or addresses), and a
    /// tunnel to it is not second-guessed by its TLS.
    pub fn lists_intercepted(&self) -> bool {
        !self.include.is_empty()
    }

    /// Whether a tunnel to `host` is intercepted (else it is passed through).
    /// A fully qualified name (`www.target.example.`, with its trailing
    /// dot) is the same host to DNS and to a client's cookie jar, so it is
    /// judged as the name without the dot: a pattern that intercepts one
    /// intercepts both, and the cookies sent to either are read.
    pub fn intercepts(&self, host: &str) -> bool {
        let host = match host.parse::<std::net::IpAddr>() {
            // An address as patterns of addresses are kept: one spelling
            // for each (and an IPv4-mapped IPv6 address as its IPv4).
            Ok(address) => canonical_ip(address),
            Err(_) => host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase(),
        };
        let matches = |patterns: &[glob::Pattern]| patterns.iter().any(|p| p.matches(&host));
        (self.include.is_empty() || matches(&self.include)) && !matches(&self.exclude)
    }
}

/// `address` written one way: IPv6 in its canonical text, an IPv4-mapped
/// IPv6 address as the IPv4 address it maps.
fn canonical_ip(address: std::net::IpAddr) -> String {
    address.to_canonical().to_string()
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

    /// A pattern written with a trailing dot matches as hosts are judged,
    /// without it; one in Unicode, which no host arrives as, is refused
    /// rather than left never to match.
    #[test]
    fn patterns_are_written_as_hosts_arrive() {
        let dotted = InterceptPolicy::new(&[], &["bank.example.".into()]).unwrap();
        assert!(!dotted.intercepts("bank.example"));
        assert!(!dotted.intercepts("bank.example."));
        assert!(InterceptPolicy::new(&[], &["*.bücher.example".into()]).is_err());
        assert!(InterceptPolicy::new(&[], &["*.".into()]).is_err());
        let punycode = InterceptPolicy::new(&[], &["*.xn--bcher-kva.example".into()]).unwrap();
        assert!(!punycode.intercepts("www.xn--bcher-kva.example"));
        // An IPv6 address in brackets names the address (hosts arrive
        // without them), not a class of characters.
        let bracketed = InterceptPolicy::new(&[], &["[2001:DB8::1]".into()]).unwrap();
        assert!(!bracketed.intercepts("2001:db8::1"));
        assert!(bracketed.intercepts("2"));
        let bare = InterceptPolicy::new(&[], &["2001:db8::*".into()]).unwrap();
        assert!(!bare.intercepts("2001:db8::7"));
        // Spelt otherwise, the same address.
        assert!(!bracketed.intercepts("2001:0db8:0::1"));
        let long = InterceptPolicy::new(&[], &["2001:0DB8:0:0::1".into()]).unwrap();
        assert!(!long.intercepts("2001:db8::1"));
        let v4 = InterceptPolicy::new(&[], &["192.0.2.7".into()]).unwrap();
        assert!(!v4.intercepts("::ffff:192.0.2.7"));
        assert!(v4.intercepts("192.0.2.8"));
    }
}
