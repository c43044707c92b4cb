# Sourced by scripts/test.sh and scripts/tests.d/*.sh (from the repository root).
# The one cargo selection every part of the suite builds with: the whole workspace plus
# the RDMA verbs code (kv-rdma's `rdma` feature). Building anything with other features
# would recompile much of the dependency tree.
DLENGINE_CARGO_SELECTION="--workspace --features dlengine-kv-rdma/rdma"

# The test binaries and the workspace's own binaries (dlengine, dlengine-operator):
# a no-op once `cargo test` has run with the same selection.
build_test_binaries() {
  cargo test -q $DLENGINE_CARGO_SELECTION --no-run
}
