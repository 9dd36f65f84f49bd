//! The node's files beside the store: incarnation, stateless-reset key,
//! known peers and the last layout. Each is small and rewritten whole
//! (write to a temporary file, then rename), so a crash leaves the old or
//! the new version, never a torn one.

use super::NodeError;
use crate::replication::layout_state::LayoutState;
use crate::replication::tokens::TokenRegistry;
use std::net::SocketAddr;
use std::path::Path;
use tracing::warn;

pub(super) const LAYOUT_FILE: &str = "layout.bin";
pub(super) const INCARNATION_FILE: &str = "incarnation";
pub(super) const STORE_FILE: &str = "store.redb";
pub(super) const RESET_KEY_FILE: &str = "reset-key";
pub(super) const PEERS_FILE: &str = "peers";

pub(super) fn file_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::File {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A restart must use a higher incarnation than the last run, or peers
/// that saw this node go down would not take it back.
pub(super) fn next_incarnation(dir: &Path) -> Result<u32, NodeError> {
    let path = dir.join(INCARNATION_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u32>().map_err(|e| NodeError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(file_err("read", &path)(e)),
    };
    let next = last.saturating_add(1);
    std::fs::write(&path, next.to_string()).map_err(file_err("write", &path))?;
    Ok(next)
}

/// The secret QUIC stateless resets are derived from, kept across restarts.
/// With it a restarted node answers packets of its previous process's
/// connections with a stateless reset, so peers drop those dead connections
/// at once and dial afresh, instead of sending into them until the idle
/// timeout (about 30 s) while the node looks isolated.
pub(super) fn reset_key(dir: &Path) -> Result<ring::hmac::Key, NodeError> {
    let path = dir.join(RESET_KEY_FILE);
    let secret = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => bytes,
        Ok(bytes) => {
            return Err(NodeError::Damaged {
                path,
                reason: format!("{} bytes, expected 32", bytes.len()),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; 32] = rand::random();
            let tmp = dir.join("reset-key.tmp");
            std::fs::write(&tmp, secret).map_err(file_err("write", &tmp))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                    .map_err(file_err("protect", &tmp))?;
            }
            std::fs::rename(&tmp, &path).map_err(file_err("write", &path))?;
            secret.to_vec()
        }
        Err(e) => return Err(file_err("read", &path)(e)),
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret))
}

/// Addresses of the peers this node last knew, one per line. A restarted
/// node joins through them as well as through its seeds: the node that
/// started the cluster has no seeds, and without them it would wait,
/// cut off with stale data, until a peer happened to probe it.
pub(super) fn load_peers(dir: &Path) -> Vec<SocketAddr> {
    let path = dir.join(PEERS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .filter_map(|line| match line.trim().parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    warn!("ignoring {line:?} in {}: not an address", path.display());
                    None
                }
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warn!("cannot read {}: {e}", path.display());
            Vec::new()
        }
    }
}

pub(super) fn save_peers(dir: &Path, peers: &[SocketAddr]) {
    let path = dir.join(PEERS_FILE);
    let tmp = dir.join("peers.tmp");
    let text: String = peers.iter().map(|a| format!("{a}\n")).collect();
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
        warn!("cannot save peers to {}: {e}", path.display());
    }
}

pub(super) fn load_layout(dir: &Path, partitions: u16) -> Result<Option<LayoutState>, NodeError> {
    let path = dir.join(LAYOUT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err("read", &path)(e)),
    };
    let state: LayoutState = postcard::from_bytes(&bytes).map_err(|e| NodeError::Damaged {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    state.validate(partitions).map_err(|e| NodeError::Damaged {
        path,
        reason: e.to_string(),
    })?;
    Ok(Some(state))
}

pub(super) fn save_layout(dir: &Path, state: &LayoutState) {
    let path = dir.join(LAYOUT_FILE);
    let tmp = dir.join("layout.bin.tmp");
    let Ok(bytes) = postcard::to_allocvec(state) else {
        return;
    };
    // Write then rename, so a crash leaves the old layout or the new one.
    if let Err(e) = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path)) {
        warn!("cannot save layout to {}: {e}", path.display());
    }
}

const TOKENS_FILE: &str = "tokens.bin";

/// The API token registry this node persisted (empty if none).
pub(super) fn load_tokens(dir: &Path) -> Result<TokenRegistry, NodeError> {
    let path = dir.join(TOKENS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenRegistry::new()),
        Err(e) => return Err(file_err("read", &path)(e)),
    };
    let registry: TokenRegistry = postcard::from_bytes(&bytes).map_err(|e| NodeError::Damaged {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    registry.validate().map_err(|e| NodeError::Damaged {
        path,
        reason: e.to_string(),
    })?;
    Ok(registry)
}

/// Saves the registry durably (written, synced, renamed): a node that
/// restarts must not accept a token it had seen revoked.
pub(super) fn save_tokens(dir: &Path, registry: &TokenRegistry) {
    let path = dir.join(TOKENS_FILE);
    let tmp = dir.join("tokens.bin.tmp");
    let Ok(bytes) = postcard::to_allocvec(registry) else {
        return;
    };
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut file, &bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        warn!("cannot save the API tokens to {}: {e}", path.display());
    }
}

pub(super) const PLACEMENT_FILE: &str = "placement.json";

/// Capacity and zone set at run time (`kvctl node set-capacity` /
/// `set-zone`): they override the configuration's from then on, across
/// restarts, until set again.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Placement {
    pub capacity: Option<u32>,
    /// `Some(None)`: no zone, whatever the configuration says.
    #[serde(
        default,
        with = "serde_with_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub zone: Option<Option<String>>,
}

/// `zone` in the file: absent (not set), `null` (no zone) or a string.
mod serde_with_none {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        v: &Option<Option<String>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Option::<String>::deserialize(d).map(Some)
    }
}

pub(super) fn load_placement(dir: &Path) -> Result<Placement, NodeError> {
    let path = dir.join(PLACEMENT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Placement::default()),
        Err(e) => return Err(file_err("read", &path)(e)),
    };
    let placement: Placement = serde_json::from_slice(&bytes).map_err(|e| NodeError::Damaged {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if let Some(Some(zone)) = &placement.zone {
        crate::replication::membership::check_zone(zone).map_err(|reason| NodeError::Damaged {
            path: path.clone(),
            reason,
        })?;
    }
    Ok(placement)
}

pub(super) fn save_placement(dir: &Path, placement: &Placement) -> std::io::Result<()> {
    let path = dir.join(PLACEMENT_FILE);
    let tmp = dir.join("placement.json.tmp");
    let bytes = serde_json::to_vec_pretty(placement).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_round_trips_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_placement(dir.path()).unwrap(), Placement::default());
        for placement in [
            Placement {
                capacity: Some(7),
                zone: None,
            },
            Placement {
                capacity: None,
                zone: Some(None),
            },
            Placement {
                capacity: Some(1),
                zone: Some(Some("eu-west".into())),
            },
        ] {
            save_placement(dir.path(), &placement).unwrap();
            assert_eq!(load_placement(dir.path()).unwrap(), placement);
        }
        for bad in [
            "{",
            "{\"capacity\": -1}",
            "{\"zone\": \"\"}",
            "{\"other\": 1}",
        ] {
            std::fs::write(dir.path().join(PLACEMENT_FILE), bad).unwrap();
            let e = load_placement(dir.path()).unwrap_err().to_string();
            assert!(e.contains(PLACEMENT_FILE), "{bad}: {e}");
        }
    }
}
