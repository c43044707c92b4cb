//! Prefill/decode disaggregation inside the engine: a prefill core hands a prompt's KV
//! off under a lease, a decode core imports it and continues. The output must be
//! token-for-token what one core produces alone, and no block may stay used afterwards.

mod common;

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::{core, greedy, model_dir, run_to_end};
use dlengine_engine::backend::cpu::CpuBackend;
use dlengine_engine::backend::KvCacheLayout;
use dlengine_engine::config::EngineConfig;
use dlengine_engine::engine::Engine;
use dlengine_engine::engine_core::{EngineCore, StepEvent};
use dlengine_engine::kv_transfer::{
    pooled_frame, EarlyKv, HostFrame, HostKvWriter, ImportedKv, KvFrame, KvHandoff, KvLocation, KvMemory, KvSource, KvTransfer, RemoteCopy,
    RemoteKvReader, StreamedKv,
};
use dlengine_engine::request::{GenerateRequest, TokenLogprob};
use dlengine_engine::sampling_params::SamplingParams;

const MODEL: &str = "qwen3-tiny";

fn config() -> EngineConfig {
    EngineConfig { block_size: 4, max_num_batched_tokens: 16, num_kv_blocks: Some(256), ..EngineConfig::default() }
}

fn request(prompt: &[u32], params: &SamplingParams, kv_transfer: KvTransfer) -> GenerateRequest {
    GenerateRequest { request_id: "r".into(), prompt_token_ids: prompt.to_vec(), params: params.clone(), kv_transfer }
}

/// Every layer's bytes at once, as one frame.
fn whole(num_blocks: usize, num_layers: usize, bytes: Vec<u8>) -> KvSource {
    KvSource::Streamed(Arc::new(StreamedKv::whole(num_blocks, num_layers, bytes)))
}

/// Runs one request on `core` until it ends; returns its tokens, logprobs and handoff.
fn drive(core: &mut EngineCore, key: u64) -> (Vec<u32>, Vec<TokenLogprob>, Option<KvHandoff>) {
    let (mut tokens, mut logprobs, mut handoff) = (Vec::new(), Vec::new(), None);
    for _ in 0..10_000 {
        if !core.has_work() {
            break;
        }
        for event in core.step() {
            match event {
                StepEvent::Token { key: k, event, .. } if k == key => {
                    tokens.extend(event.tokens);
                    logprobs.extend(event.logprobs);
                    handoff = handoff.or(event.handoff);
                }
                StepEvent::Failed { message, .. } => panic!("request failed: {message}"),
                _ => {}
            }
        }
    }
    (tokens, logprobs, handoff)
}

/// Prefills `prompt` on `prefill` and submits it to `decode` as request 2 with the KV
/// copied as bytes. Ok: prefill's first token; Err: the whole output, when prefill
/// finished the request itself.
fn hand_over(prefill: &mut EngineCore, decode: &mut EngineCore, prompt: &[u32], params: &SamplingParams) -> Result<u32, Vec<u32>> {
    prefill.add_request(1, request(prompt, params, KvTransfer::Export));
    let (first, logprobs, handoff) = drive(prefill, 1);
    let Some(handoff) = handoff else { return Err(first) };
    assert_eq!(handoff.num_tokens, prompt.len());
    let layers = decode.info().kv_layout.num_layers;
    let bytes = prefill.read_lease(handoff.lease_id, 0..layers).unwrap();
    assert!(!prefill.free_lease(handoff.lease_id), "read whole, the lease already ended on prefill");
    let first_token = logprobs.first().cloned().unwrap_or(TokenLogprob { token_id: first[0], logprob: 0.0, top: Vec::new() });
    let source = whole(handoff.blocks.len(), layers, bytes);
    decode.add_request(2, request(prompt, params, KvTransfer::Import(ImportedKv { first_token: Some(first_token), source })));
    Ok(first[0])
}

/// Prefill on one core, the KV copied as bytes, decode on another.
fn disaggregated(prefill: &mut EngineCore, decode: &mut EngineCore, prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
    match hand_over(prefill, decode, prompt, params) {
        Ok(_) => drive(decode, 2).0,
        Err(finished) => finished,
    }
}

fn prompts() -> Vec<Vec<u32>> {
    // Lengths around block boundaries (4) and above the chunk budget (16).
    [1usize, 3, 4, 5, 8, 17, 33].iter().map(|&n| (0..n as u32).map(|i| (i * 37 + n as u32 * 11) % 900 + 3).collect()).collect()
}

#[test]
fn disaggregated_output_equals_aggregated_greedy_and_seeded() {
    let seeded = SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(7), max_tokens: 12, ignore_eos: true, ..SamplingParams::default() };
    let with_logprobs = SamplingParams { logprobs: Some(2), ..greedy(6) };
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    for params in [greedy(10), seeded, with_logprobs] {
        for prompt in prompts() {
            let expected = run_to_end(&mut core(MODEL, config()), vec![(prompt.clone(), params.clone())]).remove(0).remove(0);
            let got = disaggregated(&mut prefill, &mut decode, &prompt, &params);
            assert_eq!(got, expected, "prompt of {} tokens, {params:?}", prompt.len());
        }
    }
    for (name, core) in [("prefill", &prefill), ("decode", &decode)] {
        let stats = core.stats();
        assert_eq!(stats.kv_leases, 0, "{name}");
        // Freed blocks may stay in the prefix cache, but none is referenced.
        assert_eq!(stats.kv_blocks_used, 0, "{name} leaked blocks");
    }
}

#[test]
fn prefix_cache_hits_on_the_prefill_side_still_hand_off_the_whole_prompt() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let prompt: Vec<u32> = (0..21).map(|i| i * 13 % 500 + 5).collect();
    let expected = run_to_end(&mut core(MODEL, config()), vec![(prompt.clone(), greedy(8))]).remove(0).remove(0);
    for _ in 0..2 {
        assert_eq!(disaggregated(&mut prefill, &mut decode, &prompt, &greedy(8)), expected);
    }
    assert!(prefill.stats().prefix_cache_hit_tokens > 0, "the second prefill should hit the cache");
}

#[test]
fn a_request_that_ends_on_its_first_token_is_not_handed_off() {
    let mut prefill = core(MODEL, config());
    prefill.add_request(1, request(&[5, 6, 7], &greedy(1), KvTransfer::Export));
    let (tokens, _, handoff) = drive(&mut prefill, 1);
    assert_eq!(tokens.len(), 1);
    assert!(handoff.is_none());
    assert_eq!(prefill.stats().kv_blocks_used, 0);
}

#[test]
fn an_unclaimed_lease_expires_and_frees_its_blocks() {
    let mut prefill = core(MODEL, EngineConfig { kv_lease_secs: 0, ..config() });
    prefill.add_request(1, request(&[5, 6, 7, 8, 9], &greedy(4), KvTransfer::Export));
    let (_, _, handoff) = drive(&mut prefill, 1);
    let handoff = handoff.expect("handed off");
    assert_eq!(prefill.stats().kv_leases, 1);
    prefill.step(); // expiry is checked at every step
    assert_eq!(prefill.stats().kv_leases, 0);
    assert_eq!(prefill.stats().kv_blocks_used, 0);
    assert!(prefill.read_lease(handoff.lease_id, 0..1).is_err(), "an expired lease cannot be read");
}

#[test]
fn a_payload_of_the_wrong_size_fails_the_request_and_frees_its_blocks() {
    let mut decode = core(MODEL, config());
    let first_token = Some(TokenLogprob { token_id: 9, logprob: 0.0, top: Vec::new() });
    let source = whole(2, decode.info().kv_layout.num_layers, vec![0; 10]);
    decode.add_request(1, request(&[1, 2, 3, 4, 5], &greedy(4), KvTransfer::Import(ImportedKv { first_token, source })));
    let events = decode.step();
    assert!(
        events.iter().any(|e| matches!(e, StepEvent::Failed { message, .. } if message.contains("holds 10 bytes"))),
        "{events:?}"
    );
    assert_eq!(decode.stats().kv_blocks_used, 0);
    assert!(!decode.has_work());
}

/// Prefills `prompt` for a streamed handoff: decode's request 2 is submitted and admitted
/// before any frame arrives. Returns the stream, prefill's lease and the aggregated output.
fn admit_streamed(prefill: &mut EngineCore, decode: &mut EngineCore, prompt: &[u32], params: &SamplingParams) -> (Arc<StreamedKv>, u64, Vec<u32>) {
    admit_streamed_to(prefill, decode, prompt, params, None)
}

/// As [`admit_streamed`], frames going to `writer` once the import has its blocks.
fn admit_streamed_to(
    prefill: &mut EngineCore,
    decode: &mut EngineCore,
    prompt: &[u32],
    params: &SamplingParams,
    writer: Option<Arc<dyn HostKvWriter>>,
) -> (Arc<StreamedKv>, u64, Vec<u32>) {
    let expected = run_to_end(&mut core(MODEL, config()), vec![(prompt.to_vec(), params.clone())]).remove(0).remove(0);
    prefill.add_request(1, request(prompt, params, KvTransfer::Export));
    let (first, _, handoff) = drive(prefill, 1);
    let handoff = handoff.expect("handed off");
    let stream = Arc::new(StreamedKv::with_writer(handoff.blocks.len(), "tcp", writer));
    let first_token = Some(TokenLogprob { token_id: first[0], logprob: 0.0, top: Vec::new() });
    let import = ImportedKv { first_token, source: KvSource::Streamed(stream.clone()) };
    decode.add_request(2, request(prompt, params, KvTransfer::Import(import)));
    let events = decode.step();
    assert!(events.iter().all(|e| matches!(e, StepEvent::Started { .. })), "admitted, no token yet: {events:?}");
    assert_eq!(decode.stats().kv_blocks_used, handoff.blocks.len());
    (stream, handoff.lease_id, expected)
}

fn layer_frame(prefill: &mut EngineCore, lease_id: u64, layer: usize) -> KvFrame {
    KvFrame { layers: layer..layer + 1, bytes: pooled_frame(prefill.read_lease(lease_id, layer..layer + 1).unwrap()) }
}

#[test]
fn streamed_frames_are_written_one_per_step_in_any_order_and_continue_exactly() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let prompt: Vec<u32> = (0..13).map(|i| i * 7 % 300 + 4).collect();
    let (stream, lease_id, expected) = admit_streamed(&mut prefill, &mut decode, &prompt, &greedy(6));
    let layers = decode.info().kv_layout.num_layers;
    assert!(layers > 1, "the test needs frames of several layers");
    for layer in (0..layers).rev() {
        assert!(stream.push(layer_frame(&mut prefill, lease_id, layer)));
    }
    assert!(!prefill.free_lease(lease_id), "read whole, the lease already ended on prefill");
    for _ in 1..layers {
        assert!(!decode.step().iter().any(|e| matches!(e, StepEvent::Token { .. })), "one frame per step: no token before the last");
    }
    let mut got: Vec<u32> = decode.step().into_iter().filter_map(|e| if let StepEvent::Token { event, .. } = e { Some(event.tokens) } else { None }).flatten().collect();
    assert_eq!(got.len(), 1, "the last frame's step hands out the first token");
    assert!(stream.is_closed(), "the transport is told the import needs nothing more");
    got.extend(drive(&mut decode, 2).0);
    assert_eq!(got, expected);
    assert_eq!(decode.stats().kv_blocks_used, 0);
    let imports = decode.stats().kv_imports;
    let blocks = prompt.len().div_ceil(decode.info().kv_layout.block_size);
    assert_eq!((imports.tcp.done, imports.tcp.failed), (1, 0), "{imports:?}");
    assert_eq!(imports.tcp.bytes as usize, blocks * decode.info().kv_layout.bytes_per_block());
    assert!(imports.tcp.seconds > 0.0 && imports.other == Default::default());
}

#[test]
fn a_streamed_import_equals_aggregated_output() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    for prompt in prompts() {
        let (stream, lease_id, expected) = admit_streamed(&mut prefill, &mut decode, &prompt, &greedy(7));
        for layer in 0..decode.info().kv_layout.num_layers {
            stream.push(layer_frame(&mut prefill, lease_id, layer));
        }
        assert!(!prefill.free_lease(lease_id), "read whole, the lease already ended on prefill");
        assert_eq!(drive(&mut decode, 2).0, expected, "prompt of {} tokens", prompt.len());
    }
}

#[test]
fn a_failed_transport_fails_a_streamed_import_admitted_or_not_and_frees_its_blocks() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let (stream, lease_id, _) = admit_streamed(&mut prefill, &mut decode, &[5, 6, 7, 8, 9, 10], &greedy(4));
    assert!(stream.push(layer_frame(&mut prefill, lease_id, 0)));
    assert_eq!(prefill.stats().kv_leases, 1, "a lease read in part stays");
    stream.fail("connection reset by prefill".into());
    let mut events = decode.step();
    events.extend(decode.step());
    assert!(events.iter().any(|e| matches!(e, StepEvent::Failed { message, .. } if message.contains("connection reset by prefill"))), "{events:?}");
    assert!(stream.is_closed() && !stream.push(layer_frame(&mut prefill, lease_id, 1)), "later frames are refused");
    assert_eq!(decode.stats().kv_blocks_used, 0);
    // Failed before admission: no block is taken at all.
    let queued = Arc::new(StreamedKv::new(2, "tcp"));
    queued.fail("prefill refused the pull".into());
    let import = ImportedKv { first_token: None, source: KvSource::Streamed(queued.clone()) };
    decode.add_request(3, request(&[1, 2, 3, 4, 5], &greedy(4), KvTransfer::Import(import)));
    let events = decode.step();
    assert!(events.iter().any(|e| matches!(e, StepEvent::Failed { key: 3, message, .. } if message.contains("refused the pull"))), "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, StepEvent::Started { key: 3, .. })), "never admitted");
    assert!(queued.is_closed());
    assert!(!decode.has_work());
    assert_eq!(decode.stats().kv_blocks_used, 0);
    let tcp = decode.stats().kv_imports.tcp;
    assert_eq!((tcp.done, tcp.failed, tcp.bytes), (0, 2, 0), "both failures counted, admitted or not");
}

#[test]
fn an_aborted_streamed_import_frees_its_blocks_at_once_and_a_repeated_layer_fails() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let (stream, lease_id, _) = admit_streamed(&mut prefill, &mut decode, &[5, 6, 7, 8, 9, 10], &greedy(4));
    assert!(stream.push(layer_frame(&mut prefill, lease_id, 0)));
    decode.abort(2);
    assert_eq!(decode.stats().kv_blocks_used, 0, "only the engine thread writes these frames: nothing to wait for");
    assert!(stream.is_closed());
    let (stream, lease_id, _) = admit_streamed(&mut prefill, &mut decode, &[5, 6, 7, 8, 9, 11], &greedy(4));
    for _ in 0..2 {
        stream.push(layer_frame(&mut prefill, lease_id, 0));
    }
    let mut events = decode.step();
    events.extend(decode.step());
    assert!(events.iter().any(|e| matches!(e, StepEvent::Failed { message, .. } if message.contains("already written"))), "{events:?}");
    assert_eq!(decode.stats().kv_blocks_used, 0);
}

/// A backend's writer off the engine thread as the engine sees one: each write waits for
/// the test's go, then records what it was given (or fails). It writes no cache: these
/// tests are about when an import is complete and when its blocks may be freed; the GPU
/// tests check the bytes of the real one.
struct GatedWriter {
    go: Mutex<mpsc::Receiver<Result<(), String>>>,
    writes: Mutex<Vec<(std::ops::Range<usize>, Vec<u32>, usize, usize)>>,
}

impl GatedWriter {
    fn new() -> (Arc<Self>, mpsc::Sender<Result<(), String>>) {
        let (go, rx) = mpsc::channel();
        (Arc::new(Self { go: Mutex::new(rx), writes: Mutex::default() }), go)
    }
}

impl HostKvWriter for GatedWriter {
    fn buffer(&self, len: usize) -> Result<HostFrame, String> {
        Ok(pooled_frame(vec![0; len]))
    }

    fn write(&self, frame: &[u8], layers: std::ops::Range<usize>, blocks: &[u32], skip: usize) -> Result<(), String> {
        let outcome = self.go.lock().unwrap().recv().unwrap();
        self.writes.lock().unwrap().push((layers, blocks.to_vec(), skip, frame.len()));
        outcome
    }
}

/// `frame` delivered on a thread of its own, as a transport's task would.
fn deliver_on_a_thread(stream: &Arc<StreamedKv>, frame: KvFrame) -> std::thread::JoinHandle<bool> {
    let stream = stream.clone();
    std::thread::spawn(move || tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(stream.deliver(frame)))
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out waiting until {what}");
}

#[test]
fn frames_after_admission_go_to_the_writer_off_the_engine_thread_and_queued_ones_through_it() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let (writer, go) = GatedWriter::new();
    let prompt: Vec<u32> = (0..13).map(|i| i * 7 % 300 + 4).collect();
    let (stream, lease_id, _) = admit_streamed_to(&mut prefill, &mut decode, &prompt, &greedy(4), Some(writer.clone()));
    let layers = decode.info().kv_layout.num_layers;
    let layout = decode.info().kv_layout.clone();
    let frame_bytes = prompt.len().div_ceil(layout.block_size) * layout.bytes_per_block() / layers;
    // Every layer but the first arrives after admission: written off the engine thread.
    let delivering: Vec<_> = (1..layers).map(|l| deliver_on_a_thread(&stream, layer_frame(&mut prefill, lease_id, l))).collect();
    wait_until("the writes are in flight", || stream.is_writing());
    // The first layer came before admission (queued): the engine thread writes it, through
    // the writer too.
    assert!(stream.push(layer_frame(&mut prefill, lease_id, 0)));
    for _ in 0..layers {
        go.send(Ok(())).unwrap();
    }
    assert!(delivering.into_iter().all(|d| d.join().unwrap()), "the import still wants frames while some are missing");
    let tokens = decode.step().into_iter().filter(|e| matches!(e, StepEvent::Token { .. })).count();
    assert_eq!(tokens, 1, "the step that writes the queued frame completes the import: its first token");
    let mut writes = writer.writes.lock().unwrap().clone();
    writes.sort_by_key(|w| w.0.start);
    let blocks = writes[0].1.clone();
    assert_eq!(blocks.len(), prompt.len().div_ceil(4));
    assert_eq!(writes, (0..layers).map(|l| (l..l + 1, blocks.clone(), 0, frame_bytes)).collect::<Vec<_>>());
    decode.abort(2);
    assert_eq!(decode.stats().kv_blocks_used, 0);
}

#[test]
fn an_import_dropped_while_a_frame_is_written_off_the_engine_thread_keeps_its_blocks_until_the_write_ends() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let (writer, go) = GatedWriter::new();
    let (stream, lease_id, _) = admit_streamed_to(&mut prefill, &mut decode, &[5, 6, 7, 8, 9, 10], &greedy(4), Some(writer));
    let blocks = decode.stats().kv_blocks_used;
    let delivering = deliver_on_a_thread(&stream, layer_frame(&mut prefill, lease_id, 0));
    wait_until("the write is in flight", || stream.is_writing());
    decode.abort(2);
    decode.step();
    assert_eq!(decode.stats().kv_blocks_used, blocks, "a write may still land in them: not given to another request");
    go.send(Ok(())).unwrap();
    assert!(!delivering.join().unwrap(), "the import ended: the transport stops");
    decode.step();
    assert_eq!(decode.stats().kv_blocks_used, 0, "freed once the write is over");
    assert!(!decode.has_work());
    // A write that fails fails its import, whose blocks go once nothing writes them.
    let (writer, go) = GatedWriter::new();
    let (stream, lease_id, _) = admit_streamed_to(&mut prefill, &mut decode, &[5, 6, 7, 8, 9, 11], &greedy(4), Some(writer));
    go.send(Err("the device fell off the bus".into())).unwrap();
    assert!(!deliver_on_a_thread(&stream, layer_frame(&mut prefill, lease_id, 0)).join().unwrap());
    let events = decode.step();
    assert!(events.iter().any(|e| matches!(e, StepEvent::Failed { message, .. } if message.contains("fell off the bus"))), "{events:?}");
    assert_eq!(decode.stats().kv_blocks_used, 0);
}

#[test]
fn an_imported_requests_first_token_goes_out_before_any_forward() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let first = hand_over(&mut prefill, &mut decode, &[5, 6, 7, 8, 9, 10], &greedy(4)).expect("handed off");
    let events = decode.step();
    let tokens: Vec<u32> = events.iter().filter_map(|e| if let StepEvent::Token { event, .. } = e { Some(event.tokens.clone()) } else { None }).flatten().collect();
    assert_eq!(tokens, vec![first], "the first step hands out prefill's token");
    assert_eq!(decode.stats().steps, 0, "and runs no forward for it");
    assert_eq!(drive(&mut decode, 2).0.len(), 3, "the rest follows");
}

/// The first token of a lease as a decode engine would fetch it.
fn first_token_of(prefill: &mut EngineCore, lease_id: u64) -> Result<TokenLogprob, String> {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    prefill.await_first_token(lease_id, tx);
    rx.try_recv().expect("answered at once once sampled")
}

/// Prefills `prompt` with an early handoff; returns the announcement (checked to come
/// before the step's first token) and the handoff.
fn prefill_early(prefill: &mut EngineCore, prompt: &[u32], params: &SamplingParams) -> (EarlyKv, KvHandoff) {
    prefill.add_request(1, request(prompt, params, KvTransfer::ExportEarly));
    let mut announced = Vec::new();
    for _ in 0..100 {
        let events = prefill.step_announcing(&mut |e| announced.push(e));
        let handoff = events.into_iter().find_map(|e| if let StepEvent::Token { event, .. } = e { event.handoff } else { None });
        if let Some(handoff) = handoff {
            let [StepEvent::KvReady { kv, .. }] = &announced[..] else { panic!("one announcement before the token: {announced:?}") };
            return (kv.clone(), handoff);
        }
        assert!(announced.is_empty(), "announced only in the step that samples the first token");
    }
    panic!("no handoff");
}

#[test]
fn an_early_handoff_continues_exactly_once_its_first_token_arrives() {
    let seeded =
        SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(7), max_tokens: 9, ignore_eos: true, ..SamplingParams::default() };
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let layers = decode.info().kv_layout.num_layers;
    for params in [greedy(8), seeded] {
        for prompt in prompts() {
            let expected = run_to_end(&mut core(MODEL, config()), vec![(prompt.clone(), params.clone())]).remove(0).remove(0);
            let (early, handoff) = prefill_early(&mut prefill, &prompt, &params);
            assert_eq!((early.lease_id, &early.blocks, early.num_tokens), (handoff.lease_id, &handoff.blocks, prompt.len()));
            assert_eq!(early.ready_mark, None, "the CPU backend publishes no per-layer progress");
            // As the TCP listener does: the token first (the read ends the lease).
            let token = first_token_of(&mut prefill, early.lease_id);
            let bytes = prefill.read_lease(early.lease_id, 0..layers).unwrap();
            let import = ImportedKv { first_token: None, source: whole(early.blocks.len(), layers, bytes) };
            decode.add_request(2, request(&prompt, &params, KvTransfer::Import(import)));
            for _ in 0..3 {
                assert!(decode.step().iter().all(|e| !matches!(e, StepEvent::Token { .. })), "no token before prefill's");
            }
            decode.provide_first_token(2, token);
            assert!(!prefill.free_lease(early.lease_id), "read whole, the lease already ended on prefill");
            assert_eq!(drive(&mut decode, 2).0, expected, "prompt of {} tokens, {params:?}", prompt.len());
        }
    }
    assert_eq!((prefill.stats().kv_blocks_used, decode.stats().kv_blocks_used), (0, 0), "no block left behind");
}

#[test]
fn an_early_handoff_that_ends_on_its_first_token_still_pins_its_blocks_for_decode() {
    let mut prefill = core(MODEL, config());
    let (early, handoff) = prefill_early(&mut prefill, &[5, 6, 7, 8, 9], &greedy(1));
    assert_eq!(early.blocks, handoff.blocks);
    assert_eq!(prefill.stats().kv_blocks_leased, 2, "decode may be reading them already");
    assert!(first_token_of(&mut prefill, early.lease_id).is_ok());
    assert!(prefill.free_lease(early.lease_id));
    assert_eq!(prefill.stats().kv_blocks_used, 0);
}

#[test]
fn a_first_token_that_never_comes_fails_the_import_and_frees_its_blocks() {
    let mut decode = core(MODEL, config());
    let bytes = vec![0; 2 * decode.info().kv_layout.bytes_per_block()];
    let layers = decode.info().kv_layout.num_layers;
    for (key, admitted_first) in [(1, true), (2, false)] {
        let import = ImportedKv { first_token: None, source: whole(2, layers, bytes.clone()) };
        decode.add_request(key, request(&[1, 2, 3, 4, 5], &greedy(4), KvTransfer::Import(import)));
        if admitted_first {
            decode.step();
            assert_eq!(decode.stats().kv_blocks_used, 2, "admitted: the KV is written, the token awaited");
        }
        decode.provide_first_token(key, Err("the KV lease expired".into()));
        let events = decode.step();
        assert!(
            events.iter().any(|e| matches!(e, StepEvent::Failed { key: k, message, .. } if *k == key && message.contains("lease expired"))),
            "{events:?}"
        );
        assert_eq!(decode.stats().kv_blocks_used, 0);
        assert!(!decode.has_work());
    }
}

/// A NIC stand-in for [`KvSource::Remote`]: copies started by the engine wait until the
/// test carries them out, by memcpy between the two cores' caches as [`KvMemory`]
/// describes them (the RDMA READs themselves need a device: agent/kv-rdma/tests).
#[derive(Debug)]
struct MemcpyReader {
    /// (remote, local) address of each cache buffer, layer by layer, K before V.
    buffers: Vec<(u64, u64)>,
    block_bytes: u64,
    started: std::sync::Mutex<Vec<(Vec<(u32, u32)>, RemoteCopy)>>,
}

impl MemcpyReader {
    fn new(prefill: &mut EngineCore, decode: &mut EngineCore) -> Arc<Self> {
        let (remote, local) = (prefill.kv_memory(false).unwrap().unwrap(), decode.kv_memory(false).unwrap().unwrap());
        Self::between(remote, local, decode.info().kv_layout)
    }

    fn between(remote: KvMemory, local: KvMemory, layout: KvCacheLayout) -> Arc<Self> {
        assert_eq!((remote.location, remote.regions.len()), (KvLocation::Host, 2 * layout.num_layers));
        let buffers = remote.regions.iter().zip(&local.regions).map(|(r, l)| (r.addr, l.addr)).collect();
        let block_bytes = (layout.bytes_per_block() / (2 * layout.num_layers)) as u64;
        Arc::new(Self { buffers, block_bytes, started: Default::default() })
    }

    /// Carries out every started copy, or fails them.
    fn complete(&self, outcome: Result<(), String>) {
        for (pairs, copy) in self.started.lock().unwrap().drain(..) {
            if outcome.is_ok() {
                for &(remote, local) in &pairs {
                    for &(src, dst) in &self.buffers {
                        let (src, dst) = (src + remote as u64 * self.block_bytes, dst + local as u64 * self.block_bytes);
                        // SAFETY: both caches are alive and hold these blocks; the engine
                        // leaves the local ones alone until the copy is finished.
                        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, self.block_bytes as usize) };
                    }
                }
            }
            copy.finish(outcome.clone());
        }
    }
}

impl RemoteKvReader for MemcpyReader {
    fn transport(&self) -> &'static str {
        "memcpy"
    }

    fn start(&self, pairs: Vec<(u32, u32)>, _ready_mark: Option<u32>) -> RemoteCopy {
        let copy = RemoteCopy::default();
        self.started.lock().unwrap().push((pairs, copy.clone()));
        copy
    }
}

/// Prefills `prompt` (request 1) and submits it to `decode` as request 2, its KV to be
/// copied by `reader`. None when prefill finished the request itself.
fn hand_over_remote(prefill: &mut EngineCore, decode: &mut EngineCore, reader: &Arc<MemcpyReader>, prompt: &[u32], params: &SamplingParams) -> Option<KvHandoff> {
    prefill.add_request(1, request(prompt, params, KvTransfer::Export));
    let (first, logprobs, handoff) = drive(prefill, 1);
    let handoff = handoff?;
    let first_token = logprobs.first().cloned().unwrap_or(TokenLogprob { token_id: first[0], logprob: 0.0, top: Vec::new() });
    let source = KvSource::Remote { reader: reader.clone(), remote_blocks: handoff.blocks.clone(), ready_mark: None };
    decode.add_request(2, request(prompt, params, KvTransfer::Import(ImportedKv { first_token: Some(first_token), source })));
    Some(handoff)
}

#[test]
fn a_remote_copy_into_the_cache_continues_exactly_once_it_is_done() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let reader = MemcpyReader::new(&mut prefill, &mut decode);
    for prompt in prompts() {
        let expected = run_to_end(&mut core(MODEL, config()), vec![(prompt.clone(), greedy(8))]).remove(0).remove(0);
        let handoff = hand_over_remote(&mut prefill, &mut decode, &reader, &prompt, &greedy(8)).expect("handed off");
        for _ in 0..3 {
            assert!(decode.step().iter().all(|e| !matches!(e, StepEvent::Token { .. })), "no token while the copy runs");
            assert!(decode.has_work() && !decode.needs_step(), "a copy in flight is polled, not stepped for");
        }
        reader.complete(Ok(()));
        assert!(prefill.free_lease(handoff.lease_id));
        assert!(!prefill.free_lease(handoff.lease_id), "a lease is freed once");
        assert_eq!(drive(&mut decode, 2).0, expected, "prompt of {} tokens", prompt.len());
    }
    assert_eq!((prefill.stats().kv_blocks_used, decode.stats().kv_blocks_used), (0, 0), "no block left behind");
}

#[test]
fn a_failed_remote_copy_fails_the_request_and_frees_its_blocks() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let reader = MemcpyReader::new(&mut prefill, &mut decode);
    hand_over_remote(&mut prefill, &mut decode, &reader, &[5, 6, 7, 8, 9, 10], &greedy(4)).expect("handed off");
    decode.step();
    assert_eq!(decode.stats().kv_blocks_used, 2, "blocks allocated, the copy started");
    reader.complete(Err("RDMA READ: remote access error".into()));
    let events = decode.step();
    assert!(
        events.iter().any(|e| matches!(e, StepEvent::Failed { key: 2, message, .. } if message.contains("remote access error"))),
        "{events:?}"
    );
    assert_eq!(decode.stats().kv_blocks_used, 0);
    assert!(!decode.has_work());
}

#[test]
fn an_import_aborted_mid_copy_keeps_its_blocks_until_the_copy_is_over() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let reader = MemcpyReader::new(&mut prefill, &mut decode);
    hand_over_remote(&mut prefill, &mut decode, &reader, &[5, 6, 7, 8, 9, 10], &greedy(4)).expect("handed off");
    decode.step();
    decode.abort(2);
    decode.step();
    assert_eq!(decode.stats().kv_blocks_used, 2, "the copy may still write into them");
    reader.complete(Ok(()));
    decode.step();
    assert_eq!(decode.stats().kv_blocks_used, 0);
}

const COPYING: Duration = Duration::from_millis(400);

/// CPU time used so far by this process's (one) engine thread, from /proc (Linux; ticks
/// of 10 ms, USER_HZ being 100 wherever this runs).
fn engine_thread_cpu() -> Duration {
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        if std::fs::read_to_string(dir.join("comm")).unwrap().trim() == "dlengine-engine" {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            // After the parenthesised name come fields 3 (state) on: utime is 14, stime 15.
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            return Duration::from_millis(ticks * 10);
        }
    }
    panic!("no engine thread");
}

#[test]
fn an_engine_with_only_a_copy_in_flight_polls_it_instead_of_stepping_back_to_back() {
    let mut prefill = core(MODEL, config());
    let decode = Engine::start(&model_dir(MODEL), config(), CpuBackend::new(64 << 20)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let local = runtime.block_on(decode.kv_memory(false)).unwrap().unwrap();
    let reader = MemcpyReader::between(prefill.kv_memory(false).unwrap().unwrap(), local, decode.info().kv_layout);
    let prompt = [5, 6, 7, 8, 9, 10];
    let expected = run_to_end(&mut core(MODEL, config()), vec![(prompt.to_vec(), greedy(4))]).remove(0).remove(0);
    prefill.add_request(1, request(&prompt, &greedy(4), KvTransfer::Export));
    let (first, logprobs, handoff) = drive(&mut prefill, 1);
    let first_token = logprobs.first().cloned().unwrap_or(TokenLogprob { token_id: first[0], logprob: 0.0, top: Vec::new() });
    let source = KvSource::Remote { reader: reader.clone(), remote_blocks: handoff.expect("handed off").blocks, ready_mark: None };
    let mut stream = decode.submit(request(&prompt, &greedy(4), KvTransfer::Import(ImportedKv { first_token: Some(first_token), source }))).unwrap();
    while reader.started.lock().unwrap().is_empty() {
        std::thread::yield_now();
    }
    let cpu_before = engine_thread_cpu();
    std::thread::sleep(COPYING);
    let cpu_while_copying = engine_thread_cpu() - cpu_before;
    reader.complete(Ok(()));
    let mut tokens = Vec::new();
    while let Some(delta) = stream.next_blocking() {
        tokens.extend(delta.unwrap().token_ids);
    }
    assert_eq!(tokens, expected, "the import runs once its copy is noticed");
    // A poll every 50 µs costs a few per cent of a core in a release build, up to a
    // quarter in a debug one; stepping back to back, all of it (or what a loaded machine
    // leaves it: on two busy cores, still well over half).
    assert!(cpu_while_copying < COPYING / 2, "the engine thread used {cpu_while_copying:?} of CPU in {COPYING:?} of copying");
    decode.shutdown();
}

#[test]
fn an_import_of_a_prefix_decode_has_cached_copies_only_the_rest_and_continues_exactly() {
    let (mut prefill, mut decode) = (core(MODEL, config()), core(MODEL, config()));
    let reader = MemcpyReader::new(&mut prefill, &mut decode);
    let layers = decode.info().kv_layout.num_layers;
    let first_turn: Vec<u32> = (0..13).map(|i| i * 29 % 800 + 3).collect();
    let second_turn: Vec<u32> = first_turn[..12].iter().copied().chain([901, 77, 78, 79, 80, 81, 82]).collect();
    let third_turn: Vec<u32> = second_turn[..16].iter().copied().chain([5, 6, 7]).collect();
    let expected = |prompt: &[u32]| run_to_end(&mut core(MODEL, config()), vec![(prompt.to_vec(), greedy(6))]).remove(0).remove(0);
    // Over a remote copy: the blocks it is asked to copy.
    let mut copied = Vec::new();
    for prompt in [&first_turn, &second_turn] {
        let handoff = hand_over_remote(&mut prefill, &mut decode, &reader, prompt, &greedy(6)).expect("handed off");
        decode.step(); // admitted: the copy starts
        copied.push(reader.started.lock().unwrap().last().expect("a copy started").0.clone());
        reader.complete(Ok(()));
        assert!(prefill.free_lease(handoff.lease_id));
        assert_eq!(drive(&mut decode, 2).0, expected(prompt), "prompt of {} tokens", prompt.len());
    }
    assert_eq!(copied[0].len(), 4, "13 tokens: 4 blocks, none cached");
    assert_eq!(copied[1].len(), 2, "19 tokens: 5 blocks, the first 3 (12 shared tokens) cached");
    assert_eq!(decode.stats().prefix_cache_hit_tokens, 12);
    // Streamed frames carry every block: the cached ones' rows are skipped.
    let bytes_and_first = {
        prefill.add_request(1, request(&third_turn, &greedy(6), KvTransfer::Export));
        let (first, _, handoff) = drive(&mut prefill, 1);
        let handoff = handoff.expect("handed off");
        let bytes = prefill.read_lease(handoff.lease_id, 0..layers).unwrap();
        assert!(!prefill.free_lease(handoff.lease_id), "read whole, the lease already ended on prefill");
        (handoff.blocks.len(), bytes, first[0])
    };
    let (blocks, bytes, first) = bytes_and_first;
    let first_token = Some(TokenLogprob { token_id: first, logprob: 0.0, top: Vec::new() });
    let import = ImportedKv { first_token, source: whole(blocks, layers, bytes) };
    decode.add_request(3, request(&third_turn, &greedy(6), KvTransfer::Import(import)));
    assert_eq!(drive(&mut decode, 3).0, expected(&third_turn));
    assert_eq!(decode.stats().prefix_cache_hit_tokens, 12 + 16, "the second turn's 4 full blocks were registered and hit");
    assert_eq!(decode.stats().kv_blocks_used, 0);
}
