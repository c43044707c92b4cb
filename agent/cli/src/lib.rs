//! The `dlengine` command line, as data.
//!
//! This crate owns only flag definitions and their parsing (clap), so that the operator can
//! parse the container arguments it renders with the very parser the agent uses, without
//! linking the engine. Every multi-word flag is kebab-case; the seed's snake_case spelling
//! is accepted as an alias. Environment variables named in [`env`] are the Kubernetes
//! downward-API contract between the operator and the agent.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Names of the environment variables the agent reads (the operator sets them).
pub mod env {
    pub const API_KEY: &str = "DLENGINE_API_KEY";
    pub const NAMESPACE: &str = "POD_NAMESPACE";
    pub const POD_NAME: &str = "POD_NAME";
    pub const POD_UID: &str = "POD_UID";
    pub const POD_IP: &str = "POD_IP";
    pub const DEPLOYMENT: &str = "DLENGINE_DEPLOYMENT";
    pub const REVISION: &str = "DLENGINE_REVISION";
    pub const ETCD_ENDPOINTS: &str = "DLENGINE_ETCD_ENDPOINTS";
    pub const ADVERTISE_URL: &str = "DLENGINE_ADVERTISE_URL";
    pub const ETCD_CA_FILE: &str = "DLENGINE_ETCD_CA_FILE";
    pub const ETCD_CERT_FILE: &str = "DLENGINE_ETCD_CERT_FILE";
    pub const ETCD_KEY_FILE: &str = "DLENGINE_ETCD_KEY_FILE";
}

#[derive(Debug, Parser)]
#[command(name = "dlengine", version, about = "Kubernetes-native LLM inference engine, router and tools")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Run the OpenAI-compatible gateway in front of engines discovered in etcd.
    Router(RouterArgs),
    /// Offline batch generation without HTTP.
    Generate(GenerateArgs),
    /// Benchmarks: latency, offline throughput, serving load, host overhead.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when a GPU and its libraries are present, else CPU (and say so).
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Aggregated,
    Prefill,
    Decode,
    Encode,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Aggregated => "aggregated",
            Mode::Prefill => "prefill",
            Mode::Decode => "decode",
            Mode::Encode => "encode",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvTransport {
    Auto,
    Rdma,
    CudaIpc,
    Tcp,
}

/// Engine sizing and behaviour shared by `serve`, `generate` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Longest prompt + completion in tokens (default: the model's max_position_embeddings).
    #[arg(long, alias = "max_model_len")]
    pub max_model_len: Option<usize>,
    /// Most sequences in one step.
    #[arg(long, alias = "max_num_seqs", default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one step (prefill chunks and decodes together).
    #[arg(long, alias = "max_num_batched_tokens", default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV-cache block.
    #[arg(long, alias = "kvcache_block_size", alias = "block-size", default_value_t = 16)]
    pub kvcache_block_size: usize,
    /// Fraction of the GPU's memory for weights, activations and KV cache.
    #[arg(long, alias = "gpu_memory_utilization", default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV-cache size on the CPU backend, in MiB.
    #[arg(long, alias = "cpu_kv_cache_mib", default_value_t = 512)]
    pub cpu_kv_cache_mib: usize,
    /// Fix the number of KV blocks instead of deriving it from memory (tests, experiments).
    #[arg(long, alias = "num_kv_blocks")]
    pub num_kv_blocks: Option<usize>,
    /// Reuse KV blocks of identical prompt prefixes.
    #[arg(long, alias = "enable_prefix_caching", overrides_with = "no_enable_prefix_caching", default_value_t = true)]
    pub enable_prefix_caching: bool,
    #[arg(long, alias = "no_enable_prefix_caching", overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// GPUs one instance spreads its layers' matrices over.
    #[arg(long, alias = "tensor_parallel_size", alias = "tp", default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Which GPU of the node (CUDA ordinal) the engine runs on.
    #[arg(long, alias = "cuda_device", default_value_t = 0)]
    pub cuda_device: usize,
    /// Turn CUDA graphs off.
    #[arg(long, alias = "enforce_eager")]
    pub enforce_eager: bool,
    /// Largest decode batch captured as a CUDA graph.
    #[arg(long, alias = "max_cuda_graph_batch_size", default_value_t = 256)]
    pub max_cuda_graph_batch_size: usize,
    /// Seed for requests that do not bring their own.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl EngineArgs {
    pub fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching && !self.no_enable_prefix_caching
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json...).
    #[arg(value_name = "MODEL_DIR")]
    pub model: PathBuf,
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name clients put in `model` (default: the model directory's name).
    #[arg(long, alias = "served_model_name")]
    pub served_model_name: Option<String>,
    #[arg(long, value_enum, default_value_t = Mode::Aggregated)]
    pub mode: Mode,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Requests waiting beyond this many are refused with 429.
    #[arg(long, alias = "max_waiting_requests", default_value_t = 1024)]
    pub max_waiting_requests: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, alias = "max_request_body_bytes", default_value_t = 8 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, alias = "drain_timeout_secs", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Clients must send `Authorization: Bearer KEY`.
    #[arg(long, alias = "api_key", env = env::API_KEY, hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub transfer: TransferArgs,
}

/// Registration in etcd; identity comes from flags or the downward-API environment.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// etcd endpoints; registration is off without them.
    #[arg(long, alias = "etcd_endpoints", alias = "ctrl-address", alias = "ctrl_address",
          value_delimiter = ',', env = env::ETCD_ENDPOINTS)]
    pub etcd_endpoints: Vec<String>,
    #[arg(long, env = env::NAMESPACE, default_value = "default")]
    pub namespace: String,
    #[arg(long, env = env::DEPLOYMENT, default_value = "local")]
    pub deployment: String,
    #[arg(long, env = env::REVISION, default_value = "0")]
    pub revision: String,
    /// Unique id of this process (default: the pod UID, else random).
    #[arg(long, alias = "instance_id", env = env::POD_UID)]
    pub instance_id: Option<String>,
    /// URL other processes reach this one at (default: http://POD_IP:PORT or the host name).
    #[arg(long, alias = "advertise_url", env = env::ADVERTISE_URL)]
    pub advertise_url: Option<String>,
    /// Lease time-to-live in seconds.
    #[arg(long, alias = "lease_ttl_secs", default_value_t = 10)]
    pub lease_ttl_secs: i64,
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
}

/// TLS to etcd (https:// endpoints): PEM files, as a Kubernetes TLS secret mounts them
/// (the operator sets the environment variables when `spec.registry.tlsSecret` is given).
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdTlsArgs {
    /// CA certificate that signed etcd's server certificate.
    #[arg(long, env = env::ETCD_CA_FILE)]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate, for an etcd that checks clients (`--client-cert-auth`).
    #[arg(long, env = env::ETCD_CERT_FILE, requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, env = env::ETCD_KEY_FILE, requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
}

/// KV migration between prefill and decode engines.
#[derive(Debug, Clone, Args)]
pub struct TransferArgs {
    #[arg(long, alias = "kv_transport", value_enum, default_value_t = KvTransport::Auto)]
    pub kv_transport: KvTransport,
    /// Fail instead of falling back when RDMA is not available.
    #[arg(long, alias = "require_rdma")]
    pub require_rdma: bool,
    /// Port of the KV transfer listener (0: pick a free one).
    #[arg(long, alias = "kv_transfer_port", default_value_t = 0)]
    pub kv_transfer_port: u16,
    /// Connections a TCP pull of KV is spread over (each carries a range of layers).
    #[arg(long, alias = "kv_tcp_connections", default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub kv_tcp_connections: u8,
    /// Seconds prefill keeps a request's blocks pinned for decode to pull.
    #[arg(long, alias = "kv_lease_secs", default_value_t = 30)]
    pub kv_lease_secs: u64,
    /// RDMA device to move KV with (`ibv_devices` lists them; default: the first).
    #[arg(long, alias = "rdma_device")]
    pub rdma_device: Option<String>,
    /// Port of the RDMA device, from 1.
    #[arg(long, alias = "rdma_port", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub rdma_port: u8,
    /// GID index of the port (default: picked automatically, RoCE v2 of an IPv4 address first).
    #[arg(long, alias = "rdma_gid_index")]
    pub rdma_gid_index: Option<u8>,
    /// Queue pairs per prefill peer; a transfer's READs are spread over them.
    #[arg(long, alias = "rdma_qps", default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub rdma_qps: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    RoundRobin,
    LeastLoad,
    CacheAware,
    Session,
}

#[derive(Debug, Clone, Args)]
pub struct RouterArgs {
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, alias = "etcd_endpoints", alias = "ctrl-address", alias = "ctrl_address",
          value_delimiter = ',', env = env::ETCD_ENDPOINTS, required = true)]
    pub etcd_endpoints: Vec<String>,
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
    #[arg(long, env = env::NAMESPACE, default_value = "default")]
    pub namespace: String,
    /// Only route to engines of this deployment (default: every deployment in the namespace).
    #[arg(long, env = env::DEPLOYMENT)]
    pub deployment: Option<String>,
    #[arg(long, value_enum, default_value_t = Policy::CacheAware)]
    pub policy: Policy,
    /// Header whose value pins a session to a worker (policy `session`; falls back to `user`).
    #[arg(long, alias = "session_header", default_value = "x-session-id")]
    pub session_header: String,
    #[arg(long, alias = "api_key", env = env::API_KEY, hide_env_values = true)]
    pub api_key: Option<String>,
    /// File with one accepted API key per line.
    #[arg(long, alias = "api_key_file")]
    pub api_key_file: Option<PathBuf>,
    /// Requests per second allowed per API key (0: unlimited).
    #[arg(long, alias = "rate_limit_rps", default_value_t = 0.0)]
    pub rate_limit_rps: f64,
    #[arg(long, alias = "max_request_body_bytes", default_value_t = 8 * 1024 * 1024)]
    pub max_request_body_bytes: usize,
    /// Attempts on other workers after a connection failure or an early 5xx.
    #[arg(long, alias = "max_retries", default_value_t = 2)]
    pub max_retries: usize,
    /// Whole-request deadline in seconds.
    #[arg(long, alias = "request_timeout_secs", default_value_t = 600)]
    pub request_timeout_secs: u64,
    /// Longest silence on an upstream stream before it is cut, in seconds.
    #[arg(long, alias = "idle_timeout_secs", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    #[arg(long, alias = "drain_timeout_secs", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[arg(value_name = "MODEL_DIR")]
    pub model: PathBuf,
    /// One prompt (raw text, no chat template).
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    pub prompt: Option<String>,
    /// JSONL file: one object per line with `prompt` and optional sampling fields.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Where to write JSONL results (default: stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long, alias = "max_tokens", default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, alias = "top_p", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, alias = "top_k", default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, alias = "ignore_eos")]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Batch-1 decode speed and time to first token at several prompt lengths.
    Latency,
    /// Many prompts at once, offline.
    Throughput,
    /// An OpenAI-API load generator against a running server.
    Serving,
    /// Host-side cost of one step (scheduler, input preparation, sampling bookkeeping).
    Overhead,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub mode: BenchMode,
    /// Model directory (latency, throughput).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Server base URL (serving), e.g. http://127.0.0.1:8000.
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long, value_delimiter = ',', default_value = "128,1024,4096")]
    pub prompt_lens: Vec<usize>,
    #[arg(long, alias = "output_len", default_value_t = 256)]
    pub output_len: usize,
    #[arg(long, alias = "num_prompts", default_value_t = 256)]
    pub num_prompts: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128,256")]
    pub concurrency: Vec<usize>,
    /// Sequences running at once (overhead mode).
    #[arg(long, alias = "num_seqs", default_value_t = 256)]
    pub num_seqs: usize,
    /// Write results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_aliases_parse_like_kebab_case() {
        let kebab = Cli::try_parse_from(["dlengine", "serve", "/m", "--max-num-seqs", "7", "--kvcache-block-size", "32"]).unwrap();
        let snake = Cli::try_parse_from(["dlengine", "serve", "/m", "--max_num_seqs", "7", "--kvcache_block_size", "32"]).unwrap();
        let (Command::Serve(a), Command::Serve(b)) = (kebab.command, snake.command) else { panic!("not serve") };
        assert_eq!(a.engine.max_num_seqs, 7);
        assert_eq!(b.engine.max_num_seqs, 7);
        assert_eq!(a.engine.kvcache_block_size, b.engine.kvcache_block_size);
    }

    #[test]
    fn prefix_caching_can_be_turned_off() {
        let cli = Cli::try_parse_from(["dlengine", "serve", "/m", "--no-enable-prefix-caching"]).unwrap();
        let Command::Serve(a) = cli.command else { panic!("not serve") };
        assert!(!a.engine.prefix_caching());
        let cli = Cli::try_parse_from(["dlengine", "serve", "/m"]).unwrap();
        let Command::Serve(a) = cli.command else { panic!("not serve") };
        assert!(a.engine.prefix_caching());
    }

    #[test]
    fn bad_flags_are_errors_not_panics() {
        assert!(Cli::try_parse_from(["dlengine", "serve", "/m", "--max-num-seqs", "many"]).is_err());
        assert!(Cli::try_parse_from(["dlengine", "serve", "/m", "--device", "tpu"]).is_err());
        assert!(Cli::try_parse_from(["dlengine", "router"]).is_err(), "router needs etcd endpoints");
    }

    #[test]
    fn etcd_endpoints_split_on_commas() {
        let cli = Cli::try_parse_from(["dlengine", "serve", "/m", "--ctrl-address", "http://a:2379,http://b:2379"]).unwrap();
        let Command::Serve(a) = cli.command else { panic!("not serve") };
        assert_eq!(a.registry.etcd_endpoints, vec!["http://a:2379", "http://b:2379"]);
    }
}
