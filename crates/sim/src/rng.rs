//! A small, fast, seedable generator (xoshiro256++, seeded through splitmix64): a simulation run
//! is a pure function of its seed, on every machine.

#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
    /// Box–Muller yields normals in pairs; the second waits here.
    spare_normal: Option<f64>,
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn seeded(seed: u64) -> Rng {
        let mut x = seed;
        Rng {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
            spare_normal: None,
        }
    }

    /// The generator for run `index` of a simulation seeded with `seed`: runs are independent
    /// and each is reproducible alone.
    pub fn for_run(seed: u64, index: u64) -> Rng {
        let mut x = seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Rng::seeded(splitmix64(&mut x))
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = 1.0 - self.unit(); // (0, 1]: ln is finite
        let u2 = self.unit();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// Lognormal with the given median and log-scale standard deviation.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_have_the_moments_they_should() {
        let mut rng = Rng::seeded(42);
        let n = 200_000;
        let units: Vec<f64> = (0..n).map(|_| rng.unit()).collect();
        let mean = units.iter().sum::<f64>() / n as f64;
        // Uniform mean 1/2, sd of the mean sqrt(1/12/n) ≈ 0.00065: 5 sd.
        assert!((mean - 0.5).abs() < 0.0033, "{mean}");
        let normals: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let m = normals.iter().sum::<f64>() / n as f64;
        let var = normals.iter().map(|z| (z - m) * (z - m)).sum::<f64>() / n as f64;
        // Mean sd 1/sqrt(n) ≈ 0.0022; variance sd sqrt(2/n) ≈ 0.0032: 5 sd each.
        assert!(m.abs() < 0.011 && (var - 1.0).abs() < 0.016, "{m} {var}");
        let mut logs: Vec<f64> = (0..n).map(|_| rng.lognormal(50.0, 0.5)).collect();
        logs.sort_by(f64::total_cmp);
        let median = logs[n / 2];
        assert!((median - 50.0).abs() < 0.5, "{median}");
        assert_eq!(Rng::for_run(7, 3).next_u64(), Rng::for_run(7, 3).next_u64());
        assert_ne!(Rng::for_run(7, 3).next_u64(), Rng::for_run(7, 4).next_u64());
    }
}
