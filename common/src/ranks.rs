//! Starting rank processes, the one way every launcher does it (the worker
//! agent, `flamingoctl train`, the multi-process tests and the benches):
//! torchrun's rendezvous environment ([`RankEnv`]), and how the process is
//! tied to whoever started it ([`Tie`]): its own session and process group,
//! so a stop can kill the rank and everything it started, and death with
//! its parent, so a launcher killed with SIGKILL takes its ranks along.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// torchrun's variables for one rank, and flamingo's `FLAMINGO_LOCAL_ADDR`
/// (the address this node's ranks bind their own sockets to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: u32,
    pub world_size: u32,
    pub local_rank: u32,
    pub local_world_size: u32,
    /// The node's rank (torchrun's `GROUP_RANK`).
    pub group_rank: u32,
    pub master_addr: String,
    pub master_port: u16,
    pub local_addr: String,
}

impl RankEnv {
    /// Rank `rank` of `world_size` ranks all on this machine, meeting at
    /// 127.0.0.1:`master_port`.
    pub fn local(rank: u32, world_size: u32, master_port: u16) -> Self {
        Self {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            group_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port,
            local_addr: "127.0.0.1".into(),
        }
    }

    /// Splits the local world into nodes of `per_node` consecutive ranks
    /// (torchrun's numbering), as if they ran on several machines (`hybrid`
    /// sharding is tested and tried so on one machine).
    pub fn split_into_nodes_of(&mut self, per_node: u32) {
        let per_node = per_node.max(1);
        self.local_world_size = per_node;
        self.local_rank = self.rank % per_node;
        self.group_rank = self.rank / per_node;
    }

    /// The variables, as (name, value).
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("GROUP_RANK", self.group_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            ("FLAMINGO_LOCAL_ADDR", self.local_addr.clone()),
        ]
    }

    /// Sets the variables on `command`.
    pub fn apply<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command.envs(self.vars())
    }
}

/// How a started process is tied to the one that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tie {
    /// A session (and process group) of its own: a stop signals the whole
    /// group, and a terminal's Ctrl-C does not reach it.
    pub own_session: bool,
    /// SIGKILL when the starting thread's process dies.
    pub dies_with_parent: bool,
}

impl Tie {
    /// A rank under an agent: own process group, dies with the agent.
    pub const RANK: Self = Self {
        own_session: true,
        dies_with_parent: true,
    };
    /// A rank of a foreground launcher (`flamingoctl train`, tests,
    /// benches): stays in the launcher's group (Ctrl-C reaches it), dies
    /// with the launcher.
    pub const FOREGROUND_RANK: Self = Self {
        own_session: false,
        dies_with_parent: true,
    };
    /// A daemon that outlives its starter (`flamingoctl up`).
    pub const DAEMON: Self = Self {
        own_session: true,
        dies_with_parent: false,
    };

    /// Arranges `command`'s child to be tied so.
    pub fn apply(self, command: &mut Command) -> &mut Command {
        if !self.own_session && !self.dies_with_parent {
            return command;
        }
        // SAFETY: only async-signal-safe calls (setsid, prctl) between fork
        // and exec.
        unsafe {
            command.pre_exec(move || {
                if self.own_session && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if self.dies_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

/// Starts `world_size` ranks on this machine (master 127.0.0.1:`port`),
/// each `command(env)` with the rank's variables set and tied as
/// [`Tie::FOREGROUND_RANK`]. `command` may change `env` first (a test that
/// emulates several nodes calls [`RankEnv::split_into_nodes_of`]). The ranks started so
/// far are killed if one cannot start.
pub fn spawn_local_world(
    world_size: u32,
    port: u16,
    mut command: impl FnMut(&mut RankEnv) -> Command,
) -> std::io::Result<Vec<Child>> {
    let mut children: Vec<Child> = Vec::with_capacity(world_size as usize);
    for rank in 0..world_size {
        let mut env = RankEnv::local(rank, world_size, port);
        let mut built = command(&mut env);
        env.apply(&mut built);
        Tie::FOREGROUND_RANK.apply(&mut built);
        match built.spawn() {
            Ok(child) => children.push(child),
            Err(error) => {
                for child in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let program = built.get_program().to_string_lossy().into_owned();
                return Err(std::io::Error::new(
                    error.kind(),
                    format!("starting rank {rank} ({program}): {error}"),
                ));
            }
        }
    }
    Ok(children)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_torchruns_variables() {
        let children = spawn_local_world(2, 29999, |env| {
            env.split_into_nodes_of(1);
            let mut command = Command::new("sh");
            command
                .args([
                    "-c",
                    "echo $RANK/$WORLD_SIZE/$LOCAL_WORLD_SIZE/$MASTER_ADDR:$MASTER_PORT",
                ])
                .stdout(std::process::Stdio::piped());
            command
        })
        .unwrap();
        let lines: Vec<String> = children
            .into_iter()
            .map(|child| {
                let output = child.wait_with_output().unwrap();
                assert!(output.status.success());
                String::from_utf8(output.stdout).unwrap().trim().to_string()
            })
            .collect();
        assert_eq!(lines, ["0/2/1/127.0.0.1:29999", "1/2/1/127.0.0.1:29999"]);
    }

    #[test]
    fn an_own_session_is_its_own_process_group() {
        let mut command = Command::new("sh");
        command
            // /proc/<pid>/stat: pid (comm) state ppid pgrp session …
            .args(["-c", "cut -d' ' -f5,6 /proc/$$/stat"])
            .stdout(std::process::Stdio::piped());
        Tie::RANK.apply(&mut command);
        let child = command.spawn().unwrap();
        let pid = child.id();
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let ids: Vec<u32> = text
            .split_whitespace()
            .map(|id| id.parse().unwrap())
            .collect();
        assert_eq!(
            ids,
            [pid, pid],
            "process group and session are the child's own"
        );
    }
}
