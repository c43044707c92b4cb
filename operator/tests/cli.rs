//! The operator binary's command line: `crd` prints exactly the CRDs the repository and the
//! chart ship, and a bad command line exits 2 with one line of explanation.

use std::process::Command;

const OPERATOR: &str = env!("CARGO_BIN_EXE_dlengine-operator");

#[test]
fn crd_prints_the_crds_the_repository_ships() {
    let out = Command::new(OPERATOR).arg("crd").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shipped = include_str!("../../crds/dlengine.io.yaml");
    assert!(
        String::from_utf8_lossy(&out.stdout) == shipped,
        "crds/ is stale: cargo run -p dlengine-operator -- crd > crds/dlengine.io.yaml"
    );
}

#[test]
fn a_bad_command_line_exits_2_with_one_line() {
    let out = Command::new(OPERATOR).args(["run", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}
