//! Renders the desired netfilter state as ONE transaction: an
//! `iptables-restore --noflush` input that rewrites the `TUNNEL-PORT` chain
//! and its jumps, or an `nft -f` script that replaces Tether's own table.
//! Pure functions over text, so they are unit-tested without root.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::records::{Entry, Records};

/// The nat chain Tether owns.
pub const CHAIN: &str = "TUNNEL-PORT";
/// Comment on the jump rules, marking them as Tether's.
pub const JUMP_COMMENT: &str = "tether tunnel ports";
/// The native nftables table Tether owns (family inet).
pub const NFT_TABLE: &str = "tether_tunnel";
/// Built-in nat chains that jump to [`CHAIN`].
pub const HOOKS: [&str; 2] = ["PREROUTING", "OUTPUT"];

/// Address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 (`iptables`).
    V4,
    /// IPv6 (`ip6tables`).
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

pub use tether_tunnel::Cidr;

/// Which destinations are redirected. Empty means every destination: that is
/// KubeEdge's behaviour, and it hijacks the tunnel ports of every address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestMatch {
    /// Edge node networks.
    pub cidrs: Vec<Cidr>,
    /// An ipset (hash:ip or hash:net) of IPv4 edge node addresses.
    pub ipset: Option<String>,
    /// An ipset of IPv6 edge node addresses.
    pub ipset6: Option<String>,
}

impl DestMatch {
    fn is_any(&self) -> bool {
        self.cidrs.is_empty() && self.ipset.is_none() && self.ipset6.is_none()
    }

    /// The iptables match arguments for `family`; empty list means "never".
    fn iptables(&self, family: Family) -> Vec<String> {
        if self.is_any() {
            return vec![String::new()];
        }
        let mut out: Vec<String> = self
            .cidrs
            .iter()
            .filter(|c| Family::of(&c.addr()) == family)
            .map(|c| format!("-d {c} "))
            .collect();
        let set = match family {
            Family::V4 => &self.ipset,
            Family::V6 => &self.ipset6,
        };
        if let Some(set) = set {
            out.push(format!("-m set --match-set {set} dst "));
        }
        out
    }
}

/// Inputs that cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// nftables has no ipsets.
    #[error("an ipset destination match needs an iptables backend; use --node-cidr with nftables")]
    IpsetWithNftables,
    /// An ipset name that could break the transaction syntax.
    #[error("invalid ipset name {0:?}")]
    IpsetName(String),
}

fn check_ipset(name: &Option<String>) -> Result<(), RenderError> {
    match name {
        Some(n)
            if n.is_empty()
                || n.len() > 31
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            Err(RenderError::IpsetName(n.clone()))
        }
        _ => Ok(()),
    }
}

fn target(entry: &Entry, stream_port: u16) -> String {
    match entry.replica {
        IpAddr::V4(ip) => format!("{ip}:{stream_port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{stream_port}"),
    }
}

/// The `-A TUNNEL-PORT` rules for `family`, in `iptables-save` form.
pub fn chain_rules(
    records: &Records,
    family: Family,
    stream_port: u16,
    dst: &DestMatch,
) -> Vec<String> {
    let matches = dst.iptables(family);
    let mut out = Vec::new();
    for e in records
        .entries
        .iter()
        .filter(|e| Family::of(&e.replica) == family)
    {
        for m in &matches {
            // Written in iptables-save's order (-d before -p, other matches
            // after it), so what the kernel reports equals what we render.
            let (d, set) = if m.starts_with("-m set") {
                ("", m.as_str())
            } else {
                (m.as_str(), "")
            };
            out.push(format!(
                "-A {CHAIN} {d}-p tcp {set}-m tcp --dport {port} -m comment --comment \"tether tunnel port {port}\" -j DNAT --to-destination {to}",
                port = e.port,
                to = target(e, stream_port),
            ));
        }
    }
    out
}

fn jump_spec(hook: &str) -> String {
    format!("{hook} -p tcp -m comment --comment \"{JUMP_COMMENT}\" -j {CHAIN}")
}

/// What of the current nat table is Tether's, from `iptables-save -t nat`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owned {
    /// The chain exists.
    pub chain: bool,
    /// `-A <hook> ... -j TUNNEL-PORT` lines, in order.
    pub jumps: Vec<String>,
    /// `-A TUNNEL-PORT ...` lines, in order.
    pub rules: Vec<String>,
}

impl Owned {
    /// Reads Tether's part of an `iptables-save -t nat` dump.
    pub fn from_save(save: &str) -> Self {
        let mut owned = Self::default();
        let decl = format!(":{CHAIN} ");
        let rule = format!("-A {CHAIN} ");
        let jump = format!("-j {CHAIN}");
        for line in save.lines().map(str::trim_end) {
            if line.starts_with(&decl) {
                owned.chain = true;
            } else if line.starts_with(&rule) {
                owned.rules.push(line.to_owned());
            } else if line.starts_with("-A ")
                && (line.ends_with(&jump) || line.contains(&format!("{jump} ")))
            {
                owned.jumps.push(line.to_owned());
            }
        }
        owned
    }
}

/// True when `a` and `b` hold the same rules, ignoring the order of options
/// within a rule (and of rules within a chain part).
pub fn same_rules(a: &Owned, b: &Owned) -> bool {
    fn norm(lines: &[String]) -> Vec<Vec<&str>> {
        let mut v: Vec<Vec<&str>> = lines
            .iter()
            .map(|l| {
                let mut t: Vec<&str> = l.split_whitespace().collect();
                t.sort_unstable();
                t
            })
            .collect();
        v.sort();
        v
    }
    a.chain == b.chain && norm(&a.jumps) == norm(&b.jumps) && norm(&a.rules) == norm(&b.rules)
}

/// What `iptables-save` shows of Tether's part after a sync of `wanted`.
pub fn expected(wanted: &[String]) -> Owned {
    Owned {
        chain: true,
        jumps: HOOKS
            .iter()
            .map(|hook| format!("-A {}", jump_spec(hook)))
            .collect(),
        rules: wanted.to_vec(),
    }
}

/// The `iptables-restore --noflush` input that makes the nat table hold
/// exactly the desired chain and one jump per hook. Declaring the chain in a
/// noflush transaction creates or empties it inside the same transaction, so
/// there is never a moment without rules.
pub fn iptables_sync(
    records: &Records,
    family: Family,
    stream_port: u16,
    dst: &DestMatch,
    current: &Owned,
) -> String {
    let mut s = String::from("*nat\n");
    let _ = writeln!(s, ":{CHAIN} - [0:0]");
    for j in &current.jumps {
        let _ = writeln!(s, "-D {}", &j[3..]);
    }
    for r in chain_rules(records, family, stream_port, dst) {
        let _ = writeln!(s, "{r}");
    }
    for hook in HOOKS {
        let spec = jump_spec(hook);
        let (chain, rest) = spec.split_once(' ').expect("spec has a space");
        let _ = writeln!(s, "-I {chain} 1 {rest}");
    }
    s.push_str("COMMIT\n");
    s
}

/// The transaction that removes everything Tether owns, or None if nothing is there.
pub fn iptables_cleanup(current: &Owned) -> Option<String> {
    if !current.chain && current.jumps.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for j in &current.jumps {
        let _ = writeln!(s, "-D {}", &j[3..]);
    }
    if current.chain {
        let _ = writeln!(s, ":{CHAIN} - [0:0]");
        let _ = writeln!(s, "-X {CHAIN}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// The `nft -f` script that replaces Tether's table in one transaction
/// (create-if-missing, delete, recreate: atomic, no window without rules).
pub fn nft_sync(
    records: &Records,
    stream_port: u16,
    dst: &DestMatch,
) -> Result<String, RenderError> {
    if dst.ipset.is_some() || dst.ipset6.is_some() {
        return Err(RenderError::IpsetWithNftables);
    }
    let mut s = nft_cleanup();
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    let _ = writeln!(s, "\tchain tunnel_port {{");
    for e in &records.entries {
        let (proto, fam) = match e.replica {
            IpAddr::V4(_) => ("ip", Family::V4),
            IpAddr::V6(_) => ("ip6", Family::V6),
        };
        let cidrs: Vec<String> = dst
            .cidrs
            .iter()
            .filter(|c| Family::of(&c.addr()) == fam)
            .map(Cidr::to_string)
            .collect();
        if !dst.is_any() && cidrs.is_empty() {
            continue;
        }
        let daddr = if cidrs.is_empty() {
            String::new()
        } else {
            format!("{proto} daddr {{ {} }} ", cidrs.join(", "))
        };
        let _ = writeln!(
            s,
            "\t\t{daddr}tcp dport {port} dnat {proto} to {to} comment \"tether tunnel port {port}\"",
            port = e.port,
            to = target(e, stream_port),
        );
    }
    let _ = writeln!(s, "\t}}");
    for (name, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        let _ = writeln!(
            s,
            "\tchain {name} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n\t\tmeta l4proto tcp jump tunnel_port comment \"{JUMP_COMMENT}\"\n\t}}"
        );
    }
    s.push_str("}\n");
    Ok(s)
}

/// The script that removes Tether's table whether or not it exists.
pub fn nft_cleanup() -> String {
    format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n")
}

/// Checks names that go into transactions.
pub fn validate(dst: &DestMatch) -> Result<(), RenderError> {
    check_ipset(&dst.ipset)?;
    check_ipset(&dst.ipset6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs() -> Records {
        Records::parse(
            br#"{"ipTunnelPort":{"10.99.0.1":10351,"fd00::1":10352}}"#,
            &(10350..=10999),
        )
        .unwrap()
    }

    #[test]
    fn renders_one_transaction_with_chain_rewrite_and_jumps() {
        let current = Owned {
            chain: true,
            jumps: vec!["-A OUTPUT -j TUNNEL-PORT".into()],
            rules: vec![],
        };
        let dst = DestMatch {
            cidrs: vec![
                "10.0.0.0/24".parse().unwrap(),
                "fd00:e::/64".parse().unwrap(),
            ],
            ..Default::default()
        };
        let s = iptables_sync(&recs(), Family::V4, 10003, &dst, &current);
        assert_eq!(
            s,
            "*nat\n:TUNNEL-PORT - [0:0]\n-D OUTPUT -j TUNNEL-PORT\n\
             -A TUNNEL-PORT -d 10.0.0.0/24 -p tcp -m tcp --dport 10351 -m comment --comment \"tether tunnel port 10351\" -j DNAT --to-destination 10.99.0.1:10003\n\
             -I PREROUTING 1 -p tcp -m comment --comment \"tether tunnel ports\" -j TUNNEL-PORT\n\
             -I OUTPUT 1 -p tcp -m comment --comment \"tether tunnel ports\" -j TUNNEL-PORT\nCOMMIT\n"
        );
        let v6 = iptables_sync(&recs(), Family::V6, 10003, &dst, &Owned::default());
        assert!(
            v6.contains("-d fd00:e::/64 -p tcp -m tcp --dport 10352"),
            "{v6}"
        );
        assert!(v6.contains("--to-destination [fd00::1]:10003"), "{v6}");
    }

    #[test]
    fn family_without_matching_cidr_redirects_nothing() {
        let dst = DestMatch {
            cidrs: vec!["10.0.0.0/24".parse().unwrap()],
            ..Default::default()
        };
        assert!(chain_rules(&recs(), Family::V6, 10003, &dst).is_empty());
        assert_eq!(
            chain_rules(&recs(), Family::V4, 10003, &DestMatch::default()).len(),
            1
        );
    }

    #[test]
    fn owned_lines_are_found_and_others_ignored() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:TUNNEL-PORT - [0:0]\n:FOREIGN - [0:0]\n\
                    -A PREROUTING -p tcp -m comment --comment \"tether tunnel ports\" -j TUNNEL-PORT\n\
                    -A OUTPUT -p tcp -m tcp --dport 9999 -j FOREIGN\n\
                    -A TUNNEL-PORT -p tcp -m tcp --dport 10351 -j DNAT --to-destination 10.99.0.1:10003\nCOMMIT\n";
        let o = Owned::from_save(save);
        assert!(o.chain);
        assert_eq!(o.jumps.len(), 1);
        assert_eq!(o.rules.len(), 1);
        let c = iptables_cleanup(&o).unwrap();
        assert!(
            c.contains("-D PREROUTING -p tcp")
                && c.contains("-X TUNNEL-PORT")
                && !c.contains("FOREIGN")
        );
        assert_eq!(iptables_cleanup(&Owned::default()), None);
    }

    #[test]
    fn nft_script_replaces_own_table_atomically() {
        let s = nft_sync(&recs(), 10003, &DestMatch::default()).unwrap();
        assert!(s.starts_with("table inet tether_tunnel {}\ndelete table inet tether_tunnel\ntable inet tether_tunnel {"));
        assert!(s.contains("tcp dport 10351 dnat ip to 10.99.0.1:10003"));
        assert!(s.contains("tcp dport 10352 dnat ip6 to [fd00::1]:10003"));
        let dst = DestMatch {
            ipset: Some("edges".into()),
            ..Default::default()
        };
        assert_eq!(
            nft_sync(&recs(), 10003, &dst),
            Err(RenderError::IpsetWithNftables)
        );
        assert!(
            validate(&DestMatch {
                ipset: Some("a b".into()),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn option_order_is_not_a_change_but_a_flushed_chain_is() {
        let want = expected(&[
            "-A TUNNEL-PORT -p tcp -m set --match-set e dst -m tcp --dport 1 -j DNAT".into(),
        ]);
        let mut respelled = want.clone();
        respelled.rules =
            vec!["-A TUNNEL-PORT -p tcp -m tcp --dport 1 -m set --match-set e dst -j DNAT".into()];
        assert!(same_rules(&respelled, &want));
        let mut flushed = want.clone();
        flushed.rules.clear();
        assert!(!same_rules(&flushed, &want));
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "10.0.0.1".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }
}
