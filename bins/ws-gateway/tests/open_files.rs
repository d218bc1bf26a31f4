//! Each connection is an open file: the gateway binary raises its open-files soft limit to the
//! hard one when it starts, so that a soft limit of 1024 from a shell or a container runtime
//! does not cap it at about a thousand clients.

mod common;

use common::*;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft `Max open files` of process `pid`, from `/proc/<pid>/limits`.
fn soft_open_files(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .expect("a numeric soft limit")
}

#[tokio::test]
async fn the_gateway_raises_its_open_files_soft_limit_to_the_hard_one() {
    let fleet = Fleet::new().await;
    let hard = getrlimit(Resource::Nofile)
        .maximum
        .expect("a finite open-files hard limit");
    // The gateway inherits a soft limit well below the hard one, as from a container runtime.
    // (nextest runs each test in a process of its own.)
    let low = (hard / 2).min(1024);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(low),
            maximum: Some(hard),
        },
    )
    .expect("lowering this process's soft limit");
    let (gw, _) = fleet.gateway_process().await;
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )
    .expect("restoring this process's soft limit");
    let pid = gw.pid().expect("running");

    assert_eq!(
        soft_open_files(pid),
        hard,
        "the gateway started with a soft limit of {low} and should have raised it to {hard}"
    );
    assert!(
        gw.log().contains("open-files limit raised"),
        "the gateway says so: {}",
        gw.log()
    );
}
