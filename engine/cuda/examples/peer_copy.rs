//! Prints peer-to-peer copy bandwidth from GPU 0 to GPU 1, by who copies (see
//! `dlengine_cuda::peer_copy_bandwidth`). usage: peer_copy [MiB] (default 1792, the KV of
//! a 16K-token prompt of Qwen3-0.6B)

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(1792);
    let figures = dlengine_cuda::peer_copy_bandwidth(mib << 20)?;
    let best = figures.iter().map(|f| f.gb_per_s).fold(0.0, f64::max);
    for f in &figures {
        println!("{:>8.1} GB/s  {:>5.1}% of best  {}", f.gb_per_s, 100.0 * f.gb_per_s / best, f.way);
    }
    Ok(())
}
