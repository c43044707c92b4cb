//! The CRD's CEL rules, evaluated client-side with kube's CEL validator against the
//! generated schema: examples pass, and each bad object is refused with its message.

use kube::core::cel::Validator;
use kube::CustomResourceExt;
use serde_json::{json, Value};

use crate::crd::InferenceDeployment;
use crate::testing::samples;

fn schema() -> Value {
    let crd = InferenceDeployment::crd();
    let schema = crd.spec.versions[0].schema.clone().unwrap().open_api_v3_schema.unwrap();
    serde_json::to_value(schema).unwrap()
}

fn errors(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), object, None) {
        Ok(()) => vec![],
        Err(errors) => errors.into_iter().map(|e| e.to_string()).collect(),
    }
}

fn example(yaml: &str) -> Value {
    serde_json::to_value(samples::parse(yaml)).unwrap()
}

fn assert_refused(object: &Value, message: &str) {
    let errors = errors(object);
    assert!(errors.iter().any(|e| e.contains(message)), "expected {message:?} in {errors:#?}");
}

#[test]
fn examples_pass_every_rule() {
    for yaml in [samples::AGGREGATED, samples::DISAGGREGATED, samples::AUTOSCALED, samples::MULTINODE] {
        assert_eq!(errors(&example(yaml)), Vec::<String>::new());
    }
}

#[test]
fn duplicate_role_names_are_refused() {
    let mut dep = example(samples::AGGREGATED);
    let role = dep["spec"]["roles"][0].clone();
    dep["spec"]["roles"].as_array_mut().unwrap().push(role);
    assert_refused(&dep, "role names must be unique");
}

#[test]
fn prefill_without_decode_is_refused() {
    let mut dep = example(samples::DISAGGREGATED);
    dep["spec"]["roles"].as_array_mut().unwrap().retain(|r| r["kind"] != "Decode");
    assert_refused(&dep, "a Prefill role requires a Decode role");
}

#[test]
fn disaggregation_without_router_is_refused() {
    let mut dep = example(samples::DISAGGREGATED);
    dep["spec"]["roles"].as_array_mut().unwrap().retain(|r| r["kind"] != "Router");
    assert_refused(&dep, "requires a Router role");
}

#[test]
fn min_above_max_is_refused() {
    let mut dep = example(samples::AUTOSCALED);
    dep["spec"]["roles"][1]["autoscaling"]["minReplicas"] = json!(9);
    assert_refused(&dep, "minReplicas must be <= maxReplicas");
}

#[test]
fn require_rdma_over_tcp_is_refused() {
    let mut dep = example(samples::DISAGGREGATED);
    dep["spec"]["network"]["kvTransport"] = json!("TCP");
    assert_refused(&dep, "requireRDMA needs kvTransport Auto or RDMA");
}

#[test]
fn rdma_without_a_device_is_refused() {
    let mut dep = example(samples::DISAGGREGATED);
    dep["spec"]["network"].as_object_mut().unwrap().remove("rdma");
    assert_refused(&dep, "RDMA needs network.rdma");
}

#[test]
fn cuda_ipc_needs_host_ipc() {
    let mut dep = example(samples::DISAGGREGATED);
    dep["spec"]["network"] = json!({"kvTransport": "CudaIPC", "requireRDMA": false, "hostNetwork": false, "hostIPC": false});
    assert_refused(&dep, "CudaIPC needs hostIPC");
}

#[test]
fn an_etcd_tls_secret_needs_https_endpoints() {
    let mut dep = example(samples::AGGREGATED);
    dep["spec"]["registry"] = json!({"endpoints": ["http://etcd:2379"], "tlsSecret": "etcd-client"});
    assert_refused(&dep, "registry.tlsSecret needs https:// endpoints");
    dep["spec"]["registry"]["endpoints"] = json!(["https://etcd:2379"]);
    assert!(errors(&dep).is_empty(), "{:?}", errors(&dep));
}

#[test]
fn operator_owned_flags_are_refused_in_engine_args() {
    let mut dep = example(samples::AGGREGATED);
    dep["spec"]["roles"][0]["engineArgs"] = json!(["--port", "9000"]);
    assert_refused(&dep, "engineArgs must not set flags the operator owns");
}

#[test]
fn two_model_sources_are_refused() {
    let mut dep = example(samples::AGGREGATED);
    dep["spec"]["model"]["source"]["hostPath"] = json!({"path": "/models"});
    assert_refused(&dep, "exactly one of pvc, hostPath, image");
}

#[test]
fn inconsistent_expert_parallelism_is_refused() {
    let mut dep = example(samples::AGGREGATED);
    dep["spec"]["roles"][0]["parallelism"] = json!({"tensor": 4, "dataParallel": 1, "expert": 3});
    assert_refused(&dep, "parallelism.expert must be 1 or tensor x dataParallel");
}

#[test]
fn long_names_are_refused() {
    let mut dep = example(samples::AGGREGATED);
    dep["metadata"]["name"] = json!("a-name-that-is-much-too-long-for-children");
    assert_refused(&dep, "at most 24 characters");
}

#[test]
fn follow_role_must_exist() {
    let mut dep = example(samples::AUTOSCALED);
    dep["spec"]["roles"][2]["autoscaling"]["followRole"]["role"] = json!("nope");
    assert_refused(&dep, "followRole.role must name another non-Router role");
}

/// Every CEL rule compiles and fits the apiserver's cost budget (an over-budget rule makes
/// the apiserver refuse the CRD itself), which needs maxItems/maxLength on what it walks.
#[test]
fn every_rule_compiles_within_the_cost_budget() {
    use kube::core::cel::{compile_schema, estimate_rule_cost};
    fn walk(node: &Value, path: &str, problems: &mut Vec<String>) {
        if let Some(rules) = node.get("x-kubernetes-validations").and_then(|r| r.as_array()) {
            let compiled = compile_schema(node);
            for error in compiled.compilation_errors() {
                problems.push(format!("{path}: {error:?}"));
            }
            for rule in rules.iter().filter_map(|r| r["rule"].as_str()) {
                for warning in estimate_rule_cost(rule, &compiled) {
                    problems.push(format!("{path}: {rule}: {}", warning.message));
                }
            }
        }
        for (key, child) in node.get("properties").and_then(|p| p.as_object()).into_iter().flatten() {
            walk(child, &format!("{path}.{key}"), problems);
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), problems);
        }
    }
    for crd in crate::crdgen::all_crds() {
        let schema = serde_json::to_value(crd.spec.versions[0].schema.clone().unwrap().open_api_v3_schema.unwrap()).unwrap();
        let mut problems = Vec::new();
        walk(&schema, &crd.spec.names.kind, &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
