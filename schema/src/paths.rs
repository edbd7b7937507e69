//! Where assets live.
use std::path::PathBuf;

/// `$MINIWOB_STEER_HOME`, default `~/.cache/miniwob-steer`: where setup.sh puts assets.
pub fn assets_home() -> PathBuf {
    if let Some(p) = std::env::var_os("MINIWOB_STEER_HOME") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("miniwob-steer")
}
