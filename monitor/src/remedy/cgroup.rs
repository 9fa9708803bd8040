//! Where the remedy's sock_ops program attaches: the cgroup v2 root.

use super::RemedyError;

/// Where the cgroup v2 hierarchy is mounted on most systems; hybrid ones
/// mount it elsewhere (`/sys/fs/cgroup/unified`), found in /proc/mounts.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup v2 root: every process is below it, so every server socket.
/// An agent in a mount namespace of its own (a container, `ip netns
/// exec`) needs the host's hierarchy mounted there.
pub fn cgroup2_root() -> Result<std::path::PathBuf, RemedyError> {
    let own =
        std::fs::read_to_string("/proc/self/mounts").map_err(|source| RemedyError::Cgroup {
            path: "/proc/self/mounts".into(),
            source,
        })?;
    cgroup2_in(&own).ok_or(RemedyError::NoCgroup2)
}

/// The first cgroup2 mount in a /proc/mounts text.
fn cgroup2_in(mounts: &str) -> Option<std::path::PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| std::path::PathBuf::from(at))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_root_is_found_where_a_hybrid_system_mounts_it() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_in(hybrid),
            Some(std::path::PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_in("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0"),
            Some(CGROUP_ROOT.into())
        );
        assert_eq!(cgroup2_in("tmpfs /sys/fs/cgroup tmpfs rw 0 0"), None);
    }
}
