//! What a handful of noisy rounds can say: medians, ranges, and a bootstrap interval of a
//! ratio of medians (the bench's figures hold only as far as these say they do).

/// The median of `v` (the mean of the middle two for an even count); None if empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

/// The smallest and the largest of `v`; None if empty.
pub fn range(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().min_by(f64::total_cmp)?;
    let max = v.iter().copied().max_by(f64::total_cmp)?;
    Some((min, max))
}

/// A 90% bootstrap interval of median(a) / median(b): both samples resampled with
/// replacement 2000 times (a fixed seed, so a report is reproducible from its runs),
/// the 5th and 95th percentiles of the ratios. None if either sample is empty.
pub fn ratio_interval(a: &[f64], b: &[f64]) -> Option<(f64, f64)> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    const DRAWS: usize = 2000;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut resample = |v: &[f64]| -> f64 {
        let r: Vec<f64> = (0..v.len())
            .map(|_| v[(rng.next() % v.len() as u64) as usize])
            .collect();
        median(&r).unwrap_or(f64::NAN)
    };
    let mut ratios: Vec<f64> = (0..DRAWS)
        .map(|_| resample(a) / resample(b))
        .filter(|r| r.is_finite())
        .collect();
    ratios.sort_by(f64::total_cmp);
    if ratios.is_empty() {
        return None;
    }
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    Some((at(0.05), at(0.95)))
}

/// xorshift64: enough randomness to resample with, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_ranges_and_intervals() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(range(&[3.0, 1.0, 2.0]), Some((1.0, 3.0)));
        // Identical samples: the interval is the one ratio.
        assert_eq!(ratio_interval(&[2.0; 5], &[4.0; 5]), Some((0.5, 0.5)));
        // Spread samples: the interval holds the ratio of medians and stays within the
        // extreme ratios.
        let a = [300.0, 320.0, 340.0, 360.0, 380.0];
        let b = [600.0, 700.0, 800.0, 900.0, 1000.0];
        let (lo, hi) = ratio_interval(&a, &b).unwrap();
        assert!(lo <= 340.0 / 800.0 && 340.0 / 800.0 <= hi, "{lo} {hi}");
        assert!(lo >= 300.0 / 1000.0 && hi <= 380.0 / 600.0, "{lo} {hi}");
        assert_eq!(ratio_interval(&a, &[]), None);
    }
}
