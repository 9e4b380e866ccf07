//! Endpoint addresses: `scheme://host:port`, `unix:///path`, `unix://@name`,
//! `mem://name`, and `relay://name` (through the relay of that name).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A parsed address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// TCP (`tcp://`, and the seed's `ipv4://` / `ipv6://`).
    Tcp {
        /// Host name or IP (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// UDP, made reliable by the stream layer.
    Udp {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
    },
    /// QUIC.
    Quic {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix stream socket at a filesystem path.
    Unix(PathBuf),
    /// Unix stream socket in the abstract namespace (`unix://@name`).
    UnixAbstract(String),
    /// Same-process endpoint.
    Mem(String),
    /// Through the relay node of this name (a tunnel inside this node's
    /// connection to it); dialled only, never listened on or published.
    Relay(String),
}

/// Why an address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// No `scheme://`.
    #[error("address {0:?} has no scheme (expected scheme://...)")]
    NoScheme(String),
    /// A scheme this build does not know.
    #[error("address {address:?}: unknown scheme {scheme:?} (tcp, ipv4, ipv6, udp, quic, unix, mem, relay)")]
    UnknownScheme {
        /// The address.
        address: String,
        /// Its scheme.
        scheme: String,
    },
    /// `host:port` missing or malformed.
    #[error("address {0:?}: expected host:port with a port from 0 (listen: any free port) to 65535")]
    HostPort(String),
    /// Empty path or name.
    #[error("address {0:?}: empty path or name")]
    Empty(String),
}

fn host_port(address: &str, rest: &str) -> Result<(String, u16), AddressError> {
    let err = || AddressError::HostPort(address.to_string());
    let (host, port) = rest.rsplit_once(':').ok_or_else(err)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| err())?;
    if host.is_empty() || host.contains('/') {
        return Err(err());
    }
    Ok((host.to_string(), port))
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(address: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = address
            .split_once("://")
            .ok_or_else(|| AddressError::NoScheme(address.to_string()))?;
        match scheme.to_ascii_lowercase().as_str() {
            "tcp" | "ipv4" | "ipv6" => host_port(address, rest).map(|(host, port)| Self::Tcp { host, port }),
            "udp" => host_port(address, rest).map(|(host, port)| Self::Udp { host, port }),
            "quic" => host_port(address, rest).map(|(host, port)| Self::Quic { host, port }),
            "unix" => match rest.strip_prefix('@') {
                Some("") => Err(AddressError::Empty(address.to_string())),
                Some(name) => Ok(Self::UnixAbstract(name.to_string())),
                None if rest.is_empty() => Err(AddressError::Empty(address.to_string())),
                None => Ok(Self::Unix(PathBuf::from(rest))),
            },
            "mem" if rest.is_empty() => Err(AddressError::Empty(address.to_string())),
            "mem" => Ok(Self::Mem(rest.to_string())),
            "relay" if rest.is_empty() => Err(AddressError::Empty(address.to_string())),
            "relay" => Ok(Self::Relay(rest.to_string())),
            other => Err(AddressError::UnknownScheme {
                address: address.to_string(),
                scheme: other.to_string(),
            }),
        }
    }
}

impl Address {
    /// A Unix socket (path or abstract): reachable from the same host only.
    pub fn is_unix(&self) -> bool {
        matches!(self, Self::Unix(_) | Self::UnixAbstract(_))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bracket = |host: &str| {
            if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            }
        };
        match self {
            Self::Tcp { host, port } => write!(f, "tcp://{}:{port}", bracket(host)),
            Self::Udp { host, port } => write!(f, "udp://{}:{port}", bracket(host)),
            Self::Quic { host, port } => write!(f, "quic://{}:{port}", bracket(host)),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::UnixAbstract(name) => write!(f, "unix://@{name}"),
            Self::Mem(name) => write!(f, "mem://{name}"),
            Self::Relay(name) => write!(f, "relay://{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme() {
        let cases = [
            ("tcp://127.0.0.1:80", "tcp://127.0.0.1:80"),
            ("ipv4://10.0.0.1:1234", "tcp://10.0.0.1:1234"),
            ("ipv6://[::1]:1234", "tcp://[::1]:1234"),
            ("udp://host.example:9", "udp://host.example:9"),
            ("quic://[fe80::1]:443", "quic://[fe80::1]:443"),
            ("unix:///run/atbus.sock", "unix:///run/atbus.sock"),
            ("unix://@atbus", "unix://@atbus"),
            ("mem://node-a", "mem://node-a"),
            ("relay://relay-1", "relay://relay-1"),
        ];
        for (input, shown) in cases {
            let address: Address = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(address.to_string(), shown);
        }
    }

    #[test]
    fn rejects_bad_addresses_clearly() {
        for bad in [
            "127.0.0.1:80",
            "tcp://host",
            "tcp://host:99999",
            "unix://",
            "mem://",
            "relay://",
            "sctp://a:1",
        ] {
            let err = bad.parse::<Address>().unwrap_err();
            assert!(
                err.to_string().contains(bad) || err.to_string().contains("scheme"),
                "{err}"
            );
        }
    }
}
