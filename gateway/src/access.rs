//! Who may reach a tunnel: the client address blocks its agent declared (`agent --allow-ip`,
//! `--deny-ip`), checked by the gateway before any stream is opened, so refused traffic never
//! crosses the tunnel.

use std::net::IpAddr;

use ipnet::IpNet;

/// The address rules of one agent session: the agent's own, under the floor the gateway's auth
/// file sets for the tunnel (a client must pass both).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    floor: Option<Box<IpRules>>,
}

impl IpRules {
    /// Parses the blocks an agent sent (CIDR, or one address).
    ///
    /// # Errors
    /// The block that is not one.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Self, String> {
        let parse = |text: &String| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("{text:?} is not an address block"))
        };
        Ok(Self {
            allow: allow.iter().map(parse).collect::<Result<_, _>>()?,
            deny: deny.iter().map(parse).collect::<Result<_, _>>()?,
            floor: None,
        })
    }

    /// These rules, with `floor` (the auth file's for the tunnel) applying as well: an agent
    /// cannot loosen it.
    #[must_use]
    pub fn under(mut self, floor: Option<&IpRules>) -> Self {
        self.floor = floor.filter(|f| !f.allow.is_empty() || !f.deny.is_empty()).cloned().map(Box::new);
        self
    }

    /// Whether a client at `ip` may reach the tunnel: in no denied block, and in an allowed one
    /// when there are any. An IPv4 client seen on an IPv6 socket (`::ffff:a.b.c.d`) is matched
    /// as the IPv4 address it is.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        !self.deny.iter().any(|net| net.contains(&ip))
            && (self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip)))
            && self.floor.as_ref().is_none_or(|floor| floor.allows(ip))
    }

    /// The rules as `/connections` shows them.
    pub fn to_json(&self) -> serde_json::Value {
        let text = |nets: &[IpNet]| nets.iter().map(ToString::to_string).collect::<Vec<_>>();
        let mut rules = serde_json::json!({ "allow": text(&self.allow), "deny": text(&self.deny) });
        if let Some(floor) = &self.floor {
            rules["floor"] = floor.to_json();
        }
        rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_and_an_allow_list_shuts_out_the_rest() {
        let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let rules =
            IpRules::parse(&strings(&["127.0.0.0/8", "2001:db8::/32"]), &strings(&["127.0.0.2"])).unwrap();
        for (ip, allowed) in [
            ("127.0.0.1", true),
            ("127.0.0.2", false),
            ("::ffff:127.0.0.1", true),
            ("::ffff:127.0.0.2", false),
            ("10.0.0.1", false),
            ("2001:db8::5", true),
            ("::1", false),
        ] {
            assert_eq!(rules.allows(ip.parse().unwrap()), allowed, "{ip}");
        }
        assert!(IpRules::default().allows("192.0.2.1".parse().unwrap()));

        // A floor the agent's own rules cannot loosen: its allow-list is wider, the floor wins.
        let floor = IpRules::parse(&strings(&["127.0.0.1"]), &[]).unwrap();
        let loose = IpRules::parse(&strings(&["0.0.0.0/0"]), &[]).unwrap().under(Some(&floor));
        assert!(loose.allows("127.0.0.1".parse().unwrap()));
        assert!(!loose.allows("127.0.0.3".parse().unwrap()));
        assert!(!IpRules::default().under(Some(&floor)).allows("10.0.0.1".parse().unwrap()));
        assert!(IpRules::parse(&strings(&["10.0.0.0/33"]), &[]).is_err());
        assert!(IpRules::parse(&[], &strings(&["::g"])).is_err());
    }
}
