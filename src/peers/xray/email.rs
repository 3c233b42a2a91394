//! The names the agent gives things inside a core, and reads back: user emails from
//! `email_template` (`{node_id}`, `{uuid}`), and the core's per-user counter names. Both
//! xray_apply (which users are the agent's) and traffic_report (whose counter is whose)
//! match against them, so they live with the client rather than with either job.

use uuid::Uuid;

/// The email of `uuid` on `node` under `template`.
pub fn email_for(template: &str, node_id: u64, uuid: Uuid) -> String {
    template
        .replace("{node_id}", &node_id.to_string())
        .replace("{uuid}", &uuid.hyphenated().to_string())
        .to_lowercase()
}

/// The shape of one node's emails: `email_template` with the node id filled in, around
/// a UUID. Emails are compared in lower case, as the agent adds them. Built once and
/// reused where every counter or user of a core is matched (traffic collection).
#[derive(Debug, Clone)]
pub struct EmailShape {
    pub node_id: u64,
    prefix: String,
    suffix: String,
}

impl EmailShape {
    /// `None` when the template has no `{uuid}`.
    pub fn new(template: &str, node_id: u64) -> Option<EmailShape> {
        let t = template
            .replace("{node_id}", &node_id.to_string())
            .to_lowercase();
        let (prefix, suffix) = t.split_once("{uuid}")?;
        Some(EmailShape {
            node_id,
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        })
    }

    /// The UUID in `email`, when it has this shape. Runs for every counter of a
    /// collection, so an ASCII email (every email the agent makes) is matched without
    /// allocating.
    pub fn uuid_of(&self, email: &str) -> Option<Uuid> {
        if email.is_ascii() {
            let (b, p, s) = (
                email.as_bytes(),
                self.prefix.as_bytes(),
                self.suffix.as_bytes(),
            );
            if b.len() != p.len() + 36 + s.len()
                || !b[..p.len()].eq_ignore_ascii_case(p)
                || !b[p.len() + 36..].eq_ignore_ascii_case(s)
            {
                return None;
            }
            return Uuid::try_parse_ascii(&b[p.len()..p.len() + 36]).ok();
        }
        let e = email.to_lowercase();
        let middle = e
            .strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())?;
        if middle.len() != 36 {
            return None;
        }
        Uuid::try_parse(middle).ok()
    }
}

/// True when `email` has the template's shape for this node (a user the agent manages).
pub fn is_templated(template: &str, node_id: u64, email: &str) -> bool {
    EmailShape::new(template, node_id).is_some_and(|s| s.uuid_of(email).is_some())
}

/// `user>>>{email}>>>traffic>>>uplink` → (email, 0); `…downlink` → (email, 1).
pub fn parse_counter(name: &str) -> Option<(&str, usize)> {
    let rest = name.strip_prefix("user>>>")?;
    if let Some(email) = rest.strip_suffix(">>>traffic>>>uplink") {
        Some((email, 0))
    } else {
        rest.strip_suffix(">>>traffic>>>downlink")
            .map(|email| (email, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_shapes() {
        let id = Uuid::parse_str("6f1c1f8e-59f6-4c6e-9d1a-0b4f7a3c2d10").unwrap();
        assert_eq!(email_for("{uuid}", 3, id), id.to_string());
        assert_eq!(email_for("{node_id}:{uuid}", 3, id), format!("3:{id}"));
        assert!(is_templated("{uuid}", 3, &id.to_string().to_uppercase()));
        assert!(is_templated("{node_id}:{uuid}", 3, &format!("3:{id}")));
        assert!(!is_templated("{node_id}:{uuid}", 3, &format!("4:{id}")));
        assert!(!is_templated("{uuid}", 3, "admin@example.com"));
        assert!(!is_templated("{uuid}", 3, &format!("{id}x")));
    }

    #[test]
    fn counters_parse() {
        assert_eq!(
            parse_counter("user>>>a@x>>>traffic>>>uplink"),
            Some(("a@x", 0))
        );
        assert_eq!(
            parse_counter("user>>>a@x>>>traffic>>>downlink"),
            Some(("a@x", 1))
        );
        assert_eq!(parse_counter("inbound>>>api>>>traffic>>>uplink"), None);
        assert_eq!(parse_counter("user>>>a@x>>>online"), None);
    }

    #[test]
    fn emails_attribute_to_their_node() {
        let u = "9b2c8f4e-1f7a-4c1e-9d2a-0f5b6c7d8e9f";
        let one = EmailShape::new("{node_id}:{uuid}", 1).unwrap();
        let two = EmailShape::new("{node_id}:{uuid}", 2).unwrap();
        assert!(one.uuid_of(&format!("1:{u}")).is_some());
        assert_eq!(one.uuid_of(&format!("2:{u}")), None);
        assert!(two.uuid_of(&format!("2:{}", u.to_uppercase())).is_some());
        let plain = EmailShape::new("{uuid}", 5).unwrap();
        assert!(plain.uuid_of(u).is_some());
        assert_eq!(plain.uuid_of("admin@example.com"), None);
        assert_eq!(plain.uuid_of(&format!("{u}x")), None);
        assert!(EmailShape::new("no-uuid", 1).is_none());
    }
}
