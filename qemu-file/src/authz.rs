//! Who may connect: the distinguished names a destination accepts from its sources'
//! certificates, as QEMU's `authz-simple` and `authz-list` objects say it (the migration
//! parameter `tls-authz` names one).
//!
//! A name is the certificate's subject written as GnuTLS writes it for QEMU (RFC 4514:
//! the last RDN first, `CN=src.example,O=Example`), so the same rules serve QEMU and vmm.
//! Rules are tried in order and the first that matches decides; when none does, the
//! list's policy does (deny unless set otherwise). A rule matches exactly, or as a glob
//! where `*` stands for any run of characters and `?` for one (GLib's
//! `g_pattern_match_simple`, which QEMU uses: no brackets, no escapes).

use std::fmt;

/// What a rule, or a list without a matching rule, decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthzPolicy {
    /// The peer is let in.
    Allow,
    /// The peer is refused.
    Deny,
}

/// How a rule's pattern is compared with a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthzFormat {
    /// The whole name, byte for byte.
    Exact,
    /// `*` and `?` wildcards.
    Glob,
}

/// One rule of an `authz-list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzRule {
    /// The name, or glob, to match (QEMU's `match`).
    pub pattern: String,
    /// What a match decides.
    pub policy: AuthzPolicy,
    /// How the pattern is read.
    pub format: AuthzFormat,
}

impl AuthzRule {
    fn matches(&self, name: &str) -> bool {
        match self.format {
            AuthzFormat::Exact => self.pattern == name,
            AuthzFormat::Glob => glob_match(&self.pattern, name),
        }
    }
}

/// An authorization list, named by its object id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    /// The object's id (`tls-authz` names it), shown in refusals.
    pub id: String,
    /// The rules, first match wins.
    pub rules: Vec<AuthzRule>,
    /// What decides when no rule matches.
    pub policy: AuthzPolicy,
}

impl Authz {
    /// QEMU's `authz-simple`: exactly one name is allowed.
    pub fn simple(id: &str, identity: &str) -> Self {
        Authz {
            id: id.to_string(),
            rules: vec![AuthzRule {
                pattern: identity.to_string(),
                policy: AuthzPolicy::Allow,
                format: AuthzFormat::Exact,
            }],
            policy: AuthzPolicy::Deny,
        }
    }

    /// Whether `name` (a certificate's distinguished name) is let in.
    pub fn is_allowed(&self, name: &str) -> bool {
        let decision = self.rules.iter().find(|r| r.matches(name));
        decision.map_or(self.policy, |r| r.policy) == AuthzPolicy::Allow
    }
}

impl fmt::Display for AuthzPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthzPolicy::Allow => "allow",
            AuthzPolicy::Deny => "deny",
        })
    }
}

/// `g_pattern_match_simple`: `*` any run (also empty), `?` any one character.
fn glob_match(pattern: &str, name: &str) -> bool {
    // Greedy with one backtrack point: the last `*` seen and where it started matching.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    let chars: Vec<char> = name.chars().collect();
    let pat: Vec<char> = pattern.chars().collect();
    while n < chars.len() {
        match pat.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some('?') => {
                p += 1;
                n += 1;
            }
            Some(c) if *c == chars[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    p = sp + 1;
                    n = sn + 1;
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_as_glib_reads_them() {
        let m = glob_match;
        assert!(m("*", ""));
        assert!(m("CN=*,O=Example", "CN=src.example,O=Example"));
        assert!(m("CN=src?.example*", "CN=src1.example,O=Example"));
        assert!(!m("CN=src?.example*", "CN=src.example,O=Example"));
        assert!(m("*O=Example", "CN=a,O=Example"));
        assert!(!m("*O=Example", "CN=a,O=Example,C=GB"));
        assert!(m("a*b*c", "aXXbYYbc"));
        assert!(!m("a*b*c", "aXXbYYbd"));
        assert!(m("CN=é*", "CN=éte"));
        assert!(m("?", "é"));
        // No brackets or escapes: they are plain characters.
        assert!(m("CN=[ab]", "CN=[ab]"));
        assert!(!m("CN=[ab]", "CN=a"));
        assert!(m("x\\*", "x\\anything"));
    }

    #[test]
    fn first_matching_rule_decides_then_the_policy() {
        let rule = |p: &str, policy, format| AuthzRule {
            pattern: p.into(),
            policy,
            format,
        };
        let list = Authz {
            id: "auth0".into(),
            rules: vec![
                rule(
                    "CN=mallory,O=Example",
                    AuthzPolicy::Deny,
                    AuthzFormat::Exact,
                ),
                rule("CN=*,O=Example", AuthzPolicy::Allow, AuthzFormat::Glob),
            ],
            policy: AuthzPolicy::Deny,
        };
        assert!(list.is_allowed("CN=src.example,O=Example"));
        assert!(!list.is_allowed("CN=mallory,O=Example"));
        assert!(!list.is_allowed("CN=src.example,O=Other"));
        let open = Authz {
            policy: AuthzPolicy::Allow,
            ..list.clone()
        };
        assert!(open.is_allowed("CN=src.example,O=Other"));
        assert!(!open.is_allowed("CN=mallory,O=Example"));

        let simple = Authz::simple("a", "CN=src.example,O=Example");
        assert!(simple.is_allowed("CN=src.example,O=Example"));
        assert!(!simple.is_allowed("CN=src.example,O=Example,C=GB"));
        assert!(!simple.is_allowed("CN=*"));
    }
}
