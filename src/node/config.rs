//! Node configuration: a TOML file, then command-line flags over it.
//!
//! ```toml
//! node_id = "node-1"            # the node's name; with TLS it must be the
//!                                # name its certificate carries (default)
//! data_dir = "/var/lib/gossipkv"
//! listen = "127.0.0.1:7000"
//! advertise = "10.0.0.5:7000"       # what peers dial; default: listen
//!                                # (with port 0, the port bound)
//! seeds = ["127.0.0.1:7001"]
//! tls_dir = "/etc/gossipkv/tls"  # or insecure = true, for experiments
//! capacity = 100
//! zone = "rack-1"
//! replicas = 3
//! expect_nodes = 3               # a node starting a new cluster (no seeds):
//!                                # make the first layout once 3 are up
//! metrics_listen = "127.0.0.1:9100"
//! http_listen = "127.0.0.1:8443"  # the HTTP/JSON API (docs/http-api.md):
//!                                # HTTPS with the node's certificate
//! http_plain = false             # true: plain HTTP, no authentication
//! checkpoint_interval_ms = 10000 # how often the store flushes its pages
//!                                # (writes are durable through its
//!                                # write-ahead log in between; 10-600000)
//!
//! [limits]                       # resource bounds (src/node/limits.rs);
//!                                # every field optional, defaults shown
//! max_connections = 1024         # connections at once, all protocols
//! max_connections_per_identity = 32  # per certificate (per IP if insecure)
//! client_streams_per_connection = 16 # concurrent requests per connection
//! peer_streams_per_connection = 8
//! response_bytes_per_connection = 8388608   # 8 MiB of unread answers
//! response_bytes_total = 134217728          # 128 MiB, all clients
//! frame_read_timeout_ms = 10000  # first byte to last of one frame
//! inbound_frame_bytes_total = 268435456     # 256 MiB of frames being read
//!
//! [rebalance]                    # load metering, plans, migration
//!                                # (docs/rebalancing.md); defaults shown
//! load_report_interval_ms = 30000   # how often load is gossiped
//! half_life_secs = 60            # of the decayed per-partition rates
//! trigger = 1.25                 # plan above 1.25x a node's share...
//! aim = 1.10                     # ...down to 1.10x
//! cooldown_secs = 600            # a moved partition stays this long
//! max_moves = 8                  # per plan (a swap is two)
//! settle_secs = 120              # a layout serves this long before a plan
//! migration_budget_bytes_per_sec = 0   # 0: unlimited
//! migration_stall_secs = 5       # kvctl migrations calls a stream
//!                                # without progress this long stalled
//! auto = false                   # true: the lowest live node plans and
//!                                # applies by itself
//! ```
//!
//! Capacity and zone set with `kvctl node set-capacity` / `set-zone` are
//! kept in `DATA_DIR/placement.json` and override the values here.

use super::limits::LimitsConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("missing {field}: give it in the config file or as --{flag}")]
    Missing {
        field: &'static str,
        flag: &'static str,
    },
}

/// Default of `checkpoint_interval_ms`: the store's.
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 =
    crate::store::DEFAULT_CHECKPOINT_INTERVAL.as_millis() as u64;

/// The file's fields, all optional so that flags can supply them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    /// The address peers reach this node at, when it differs from `listen`
    /// (e.g. listening on 0.0.0.0).
    pub advertise: Option<String>,
    #[serde(default)]
    pub seeds: Vec<String>,
    pub tls_dir: Option<PathBuf>,
    #[serde(default)]
    pub insecure: bool,
    pub capacity: Option<u32>,
    pub zone: Option<String>,
    pub replicas: Option<u8>,
    pub expect_nodes: Option<usize>,
    pub metrics_listen: Option<String>,
    pub http_listen: Option<String>,
    #[serde(default)]
    pub http_plain: bool,
    pub checkpoint_interval_ms: Option<u64>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub rebalance: super::RebalanceSettings,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            // toml's message spans lines; keep it to one.
            message: e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })
    }
}

/// Security of the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Security {
    /// Mutual TLS with certificates from this directory.
    Tls(PathBuf),
    /// No authentication. Only when asked for by name.
    Insecure,
}

/// A validated node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's name (1 to 63 letters, digits, '-', '.'). With TLS it
    /// must match the certificate's, which is the default; with
    /// `insecure` and no name, the store's own id stands for it.
    pub node_id: Option<String>,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub security: Security,
    pub capacity: u32,
    pub zone: Option<String>,
    pub replicas: u8,
    /// For a node that starts a new cluster (no seeds, no saved layout):
    /// the first layout is made once this many nodes, itself included, are
    /// up, so that the cluster never serves with fewer replicas than it
    /// will have. Ignored by a node that joins through seeds.
    pub expect_nodes: usize,
    pub metrics_listen: Option<SocketAddr>,
    /// Where the HTTP/JSON API listens, if anywhere.
    pub http_listen: Option<SocketAddr>,
    /// Serve the HTTP API as plain HTTP with no authentication (asked for
    /// by name; the default is HTTPS with client certificates).
    pub http_plain: bool,
    /// How often the store flushes its pages; writes are durable through
    /// its write-ahead log in between (`StoreOptions::checkpoint_interval`).
    pub checkpoint_interval: std::time::Duration,
    /// Resource bounds, validated.
    pub limits: LimitsConfig,
    /// Load metering and the rebalance planner, validated.
    pub rebalance: super::RebalanceSettings,
}

fn addr(field: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| ConfigError::Invalid {
        field,
        reason: format!("{text:?} is not an address like 127.0.0.1:7000"),
    })
}

impl NodeConfig {
    /// Validates merged settings (flags already applied over the file).
    pub fn from_file(file: FileConfig) -> Result<NodeConfig, ConfigError> {
        let node_id = file
            .node_id
            .map(|name| {
                crate::certs::check_name(&name).map_err(|_| ConfigError::Invalid {
                    field: "node_id",
                    reason: format!(
                        "{name:?} is not a node name: use 1 to 63 letters, digits, '-' or '.'"
                    ),
                })?;
                Ok(name)
            })
            .transpose()?;
        let data_dir = file.data_dir.ok_or(ConfigError::Missing {
            field: "data_dir",
            flag: "data-dir",
        })?;
        let listen = addr("listen", file.listen.as_deref().unwrap_or("127.0.0.1:7000"))?;
        let advertise = match file.advertise.as_deref() {
            Some(text) => {
                let advertise = addr("advertise", text)?;
                if advertise.port() == 0 {
                    return Err(ConfigError::Invalid {
                        field: "advertise",
                        reason: format!("{advertise} has port 0, which peers cannot dial"),
                    });
                }
                advertise
            }
            None if listen.ip().is_unspecified() => {
                return Err(ConfigError::Invalid {
                    field: "advertise",
                    reason: format!(
                        "listen is {listen}, so peers need the address to reach this node at"
                    ),
                })
            }
            None => listen,
        };
        let seeds = file
            .seeds
            .iter()
            .map(|s| addr("seeds", s))
            .collect::<Result<Vec<_>, _>>()?;
        let security = match (file.tls_dir, file.insecure) {
            (Some(_), true) => {
                return Err(ConfigError::Invalid {
                    field: "insecure",
                    reason: "give either tls_dir or insecure, not both".into(),
                })
            }
            (Some(dir), false) => Security::Tls(dir),
            (None, true) => Security::Insecure,
            (None, false) => {
                return Err(ConfigError::Missing {
                    field: "tls_dir (or insecure = true, for experiments only)",
                    flag: "tls-dir",
                })
            }
        };
        let capacity = file.capacity.unwrap_or(100);
        if capacity == 0 {
            return Err(ConfigError::Invalid {
                field: "capacity",
                reason: "must be at least 1 (decommission a node with a leave instead)".into(),
            });
        }
        if let Some(zone) = &file.zone {
            if zone.is_empty() || zone.len() > 64 {
                return Err(ConfigError::Invalid {
                    field: "zone",
                    reason: "must be 1 to 64 bytes".into(),
                });
            }
        }
        let replicas = file.replicas.unwrap_or(3);
        if replicas == 0 {
            return Err(ConfigError::Invalid {
                field: "replicas",
                reason: "must be at least 1".into(),
            });
        }
        let expect_nodes = file.expect_nodes.unwrap_or(1);
        if expect_nodes == 0 || expect_nodes > 10_000 {
            return Err(ConfigError::Invalid {
                field: "expect_nodes",
                reason: format!("{expect_nodes} is not between 1 and 10000"),
            });
        }
        let metrics_listen = file
            .metrics_listen
            .as_deref()
            .map(|s| addr("metrics_listen", s))
            .transpose()?;
        let http_listen = file
            .http_listen
            .as_deref()
            .map(|s| addr("http_listen", s))
            .transpose()?;
        match (&http_listen, file.http_plain, &security) {
            (None, true, _) => {
                return Err(ConfigError::Invalid {
                    field: "http_plain",
                    reason: "there is no HTTP API to make plain: give http_listen too".into(),
                })
            }
            (Some(_), false, Security::Insecure) => {
                return Err(ConfigError::Invalid {
                    field: "http_listen",
                    reason: "an insecure node has no certificate to serve HTTPS with: give http_plain = true (--http-plain) for plain HTTP, or a tls_dir".into(),
                })
            }
            _ => {}
        }
        let checkpoint_interval_ms = file
            .checkpoint_interval_ms
            .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL_MS);
        if !(10..=600_000).contains(&checkpoint_interval_ms) {
            return Err(ConfigError::Invalid {
                field: "checkpoint_interval_ms",
                reason: format!(
                    "{checkpoint_interval_ms} is out of range: give 10 to 600000 (milliseconds)"
                ),
            });
        }
        file.limits
            .validate()
            .map_err(|(field, reason)| ConfigError::Invalid { field, reason })?;
        file.rebalance
            .validate()
            .map_err(|(field, reason)| ConfigError::Invalid { field, reason })?;
        Ok(NodeConfig {
            node_id,
            data_dir,
            listen,
            advertise,
            seeds,
            security,
            capacity,
            zone: file.zone,
            replicas,
            expect_nodes,
            metrics_listen,
            http_listen,
            http_plain: file.http_plain,
            checkpoint_interval: std::time::Duration::from_millis(checkpoint_interval_ms),
            limits: file.limits,
            rebalance: file.rebalance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_file(FileConfig::parse(text, Path::new("test.toml"))?)
    }

    #[test]
    fn a_bad_value_names_its_field() {
        let cases = [
            (
                "data_dir = \"d\"\ninsecure = true\nlisten = \"nope\"",
                "listen",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\nnode_id = \"node 1\"",
                "node_id",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\ncapacity = 0",
                "capacity",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\nreplicas = 0",
                "replicas",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\nexpect_nodes = 0",
                "expect_nodes",
            ),
            ("data_dir = \"d\"", "tls_dir"),
            ("insecure = true", "data_dir"),
            (
                "data_dir = \"d\"\ninsecure = true\ntls_dir = \"t\"",
                "insecure",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\nseeds = [\"x\"]",
                "seeds",
            ),
            ("data_dir = \"d\"\ninsecure = true\ncolour = 1", "colour"),
            (
                "data_dir = \"d\"\ninsecure = true\n[limits]\nmax_connections = 0",
                "limits.max_connections",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\n[limits]\nmax_streams = 1",
                "max_streams",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\nlisten = \"0.0.0.0:7000\"",
                "advertise",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\ncheckpoint_interval_ms = 5",
                "checkpoint_interval_ms",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\n[rebalance]\ntrigger = 1.05",
                "rebalance.trigger",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\n[rebalance]\nmax_moves = 0",
                "rebalance.max_moves",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\n[rebalance]\nload_report_interval_ms = 1",
                "rebalance.load_report_interval_ms",
            ),
            (
                "data_dir = \"d\"\ninsecure = true\n[rebalance]\nmigration_budget = 1",
                "migration_budget",
            ),
        ];
        for (text, field) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} gave {err:?}");
            assert!(!err.contains('\n'), "multi-line error {err:?}");
        }
        let ok = parse("data_dir = \"d\"\ntls_dir = \"t\"\nseeds = [\"127.0.0.1:1\"]").unwrap();
        assert_eq!(ok.security, Security::Tls("t".into()));
        assert_eq!(ok.seeds.len(), 1);
        assert_eq!(ok.limits, LimitsConfig::default());
        let tuned =
            parse("data_dir = \"d\"\ninsecure = true\n[limits]\nframe_read_timeout_ms = 2000")
                .unwrap();
        assert_eq!(tuned.limits.frame_read_timeout_ms, 2000);
        assert_eq!(tuned.limits.max_connections, 1024);
    }
}
