//! Deterministic randomness for the simulations: xoshiro256** seeded through splitmix64, uniform
//! draws, Box–Muller normals, and binomial draws. Written here so that the tests fix every bit of
//! their streams and need no dependency.
#![allow(dead_code)]

pub struct Rng {
    s: [u64; 4],
    spare_normal: Option<f64>,
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut st = seed;
        Rng {
            s: [
                splitmix64(&mut st),
                splitmix64(&mut st),
                splitmix64(&mut st),
                splitmix64(&mut st),
            ],
            spare_normal: None,
        }
    }

    /// xoshiro256** (Blackman & Vigna).
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform on (0, 1), never 0 or 1.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box–Muller (both values of a pair are used).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let phi = 2.0 * std::f64::consts::PI * u2;
        self.spare_normal = Some(r * phi.sin());
        r * phi.cos()
    }

    /// Lognormal with the given median and log-scale σ.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    /// Binomial(n, p): exact inversion when n·p is small (failure counts), a rounded normal
    /// approximation when n·p·(1−p) ≥ 10 (splitting requests between arms, where only the share
    /// matters and the tests condition on it anyway).
    pub fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if n == 0 || p <= 0.0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        let var = n as f64 * p * (1.0 - p);
        if var >= 10.0 {
            let x = (n as f64 * p + var.sqrt() * self.normal()).round();
            return x.clamp(0.0, n as f64) as u64;
        }
        // Inversion from k = 0: P(0) = (1 − p)^n, P(k+1) = P(k)·(n − k)/(k + 1)·p/(1 − p).
        let u = self.uniform();
        let mut k = 0u64;
        let mut pk = (1.0 - p).powf(n as f64);
        let mut cdf = pk;
        let odds = p / (1.0 - p);
        while u > cdf && k < n {
            pk *= (n - k) as f64 / (k + 1) as f64 * odds;
            k += 1;
            cdf += pk;
            if pk < 1e-300 {
                break;
            }
        }
        k
    }
}

/// The median of a sample (the lower middle for even sizes).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[(values.len() - 1) / 2]
}

/// The largest count of false rejections among `runs` that stays within α plus three binomial
/// standard deviations: ⌊runs·α + 3·√(runs·α·(1−α))⌋.
pub fn three_sigma_limit(runs: u64, alpha: f64) -> u64 {
    let n = runs as f64;
    (n * alpha + 3.0 * (n * alpha * (1.0 - alpha)).sqrt()).floor() as u64
}
