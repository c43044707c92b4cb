//! Rotary embedding tables, computed on the host the way Hugging Face does (f32 angles
//! `position * inv_freq`), including Llama 3's frequency scaling.

use crate::config::RopeScaling;

/// Inverse frequencies of the rotary pairs, `head_dim / 2` of them.
pub fn inv_freq(head_dim: usize, theta: f32, scaling: Option<RopeScaling>) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / (theta as f64).powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect();
    match scaling {
        None => base,
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let old_len = original_max_position_embeddings as f32;
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Table [max_positions, head_dim]: per position, cos of each pair's angle, then sin.
pub fn rope_table(head_dim: usize, theta: f32, scaling: Option<RopeScaling>, max_positions: usize) -> Vec<f32> {
    let freqs = inv_freq(head_dim, theta, scaling);
    let half = head_dim / 2;
    let mut table = vec![0.0f32; max_positions * head_dim];
    for (pos, row) in table.chunks_mut(head_dim).enumerate() {
        for (i, &f) in freqs.iter().enumerate() {
            let angle = pos as f32 * f;
            row[i] = angle.cos();
            row[half + i] = angle.sin();
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_divides_low_frequencies_only() {
        let plain = inv_freq(64, 500_000.0, None);
        let scaled = inv_freq(
            64,
            500_000.0,
            Some(RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 }),
        );
        assert_eq!(plain[0], scaled[0], "highest frequency untouched");
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12, "lowest frequency divided by the factor");
    }
}
