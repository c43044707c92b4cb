//! With the `rdma` feature: compiles the verbs shim (src/verbs/shim.c) and generates
//! bindings to rdma-core's libibverbs with bindgen. Without it: nothing.
//!
//! `IBVERBS_INCLUDE_DIR` / `IBVERBS_LIB_DIR` point at a non-system rdma-core (e.g. a
//! vendor OFED tree); by default the system include and library paths are used.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "rdma")]
    verbs::build();
}

#[cfg(feature = "rdma")]
mod verbs {
    use std::env;
    use std::path::PathBuf;

    const MISSING: &str = "libibverbs headers (infiniband/verbs.h) not found: install rdma-core's \
        development package (Debian/Ubuntu: `apt-get install libibverbs-dev libclang-dev`; \
        RHEL: `dnf install rdma-core-devel clang-devel`) or set IBVERBS_INCLUDE_DIR";

    pub fn build() {
        for var in ["IBVERBS_INCLUDE_DIR", "IBVERBS_LIB_DIR"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        println!("cargo:rerun-if-changed=src/verbs/shim.h");
        println!("cargo:rerun-if-changed=src/verbs/shim.c");
        let include = env::var_os("IBVERBS_INCLUDE_DIR").map(PathBuf::from);
        if let Some(dir) = &include {
            if !dir.join("infiniband/verbs.h").is_file() {
                panic!("{MISSING} (IBVERBS_INCLUDE_DIR={} has no infiniband/verbs.h)", dir.display());
            }
        } else if !PathBuf::from("/usr/include/infiniband/verbs.h").is_file()
            && !PathBuf::from("/usr/local/include/infiniband/verbs.h").is_file()
        {
            println!("cargo:warning={MISSING}");
        }

        let mut shim = cc::Build::new();
        shim.file("src/verbs/shim.c").warnings(true);
        if let Some(dir) = &include {
            shim.include(dir);
        }
        shim.compile("dlengine_kv_rdma_shim");

        // The shim's inlines call into libibverbs, so it must come after the shim on the
        // link line: cc printed the shim's link line above, this one follows it. Dynamic
        // linking: the provider drivers (mlx5, rxe, ...) are loaded by libibverbs itself.
        if let Some(dir) = env::var_os("IBVERBS_LIB_DIR") {
            println!("cargo:rustc-link-search=native={}", PathBuf::from(dir).display());
        }
        println!("cargo:rustc-link-lib=dylib=ibverbs");

        let mut builder = bindgen::Builder::default()
            .header("src/verbs/shim.h")
            // Only what the crate calls; the types they need come along recursively.
            .allowlist_function("dlk_.*")
            .allowlist_function(
                "ibv_(get_device_list|free_device_list|get_device_name|open_device|close_device|\
                 query_device|alloc_pd|dealloc_pd|reg_dmabuf_mr|dereg_mr|create_cq|destroy_cq|\
                 create_qp|destroy_qp|modify_qp|wc_status_str|port_state_str)",
            )
            .allowlist_type("ibv_(qp_state|qp_type|mtu|wr_opcode|send_flags|access_flags|qp_attr_mask|wc_status|wc_opcode|port_state|gid_type|gid_entry)")
            .allowlist_var("IBV_LINK_LAYER_.*")
            .prepend_enum_name(false)
            .derive_debug(false)
            .generate_comments(false)
            .layout_tests(true);
        if let Some(dir) = &include {
            builder = builder.clang_arg(format!("-I{}", dir.display()));
        }
        let bindings =
            builder.generate().unwrap_or_else(|e| panic!("bindgen on infiniband/verbs.h failed: {e}. {MISSING}"));
        let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("verbs_sys.rs");
        bindings.write_to_file(&out).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    }
}
