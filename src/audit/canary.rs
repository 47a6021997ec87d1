//! The audit's canaries: black-box ones (examples with a random wrong answer,
//! added to the training data by [`WithCanaries`]) and white-box gradient
//! (Dirac) ones, injected into the clipped sum by `Injector`.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::data::{Batch, DataSource};
use crate::train::step::AuditHook;
use crate::{Error, Result};

/// A dataset plus the included canaries: indices `0..base.len()` are the base
/// examples, then one index per included canary. Generic over both sources, so
/// the audit runs on any [`DataSource`].
pub struct WithCanaries<'a> {
    base: &'a dyn DataSource,
    canaries: &'a dyn DataSource,
    included: Vec<usize>,
}

impl<'a> WithCanaries<'a> {
    /// `base` plus the canaries of `canaries` at `included` (indices into it).
    pub fn new(
        base: &'a dyn DataSource,
        canaries: &'a dyn DataSource,
        included: Vec<usize>,
    ) -> Result<Self> {
        if let Some(&bad) = included.iter().find(|&&i| i >= canaries.len()) {
            return Err(Error::Internal(format!(
                "canary {bad} is outside the {} canaries",
                canaries.len()
            )));
        }
        Ok(Self {
            base,
            canaries,
            included,
        })
    }
}

/// Appends `b`'s examples to `a` (same image size and text length).
fn append(a: &mut Batch, b: Batch) -> Result<()> {
    if b.size == 0 {
        return Ok(());
    }
    if a.size == 0 {
        *a = b;
        return Ok(());
    }
    if a.image_size != b.image_size || a.text_len != b.text_len {
        return Err(Error::Format(format!(
            "the canaries ({0}×{0} images, {1} tokens) do not match the training data \
             ({2}×{2}, {3}); draw them from the same task",
            b.image_size, b.text_len, a.image_size, a.text_len
        )));
    }
    a.image_pos = match (a.image_pos.take(), b.image_pos) {
        (None, None) => None,
        (Some(mut x), Some(y)) => {
            x.extend(y);
            Some(x)
        }
        _ => {
            return Err(Error::Format(
                "the canaries place their image tokens differently from the training data; \
                 draw them from the same kind of data source"
                    .into(),
            ))
        }
    };
    a.size += b.size;
    a.images.extend(b.images);
    a.input_ids.extend(b.input_ids);
    a.targets.extend(b.targets);
    a.loss_mask.extend(b.loss_mask);
    a.example_ids.extend(b.example_ids);
    Ok(())
}

impl DataSource for WithCanaries<'_> {
    fn len(&self) -> usize {
        self.base.len() + self.included.len()
    }

    fn collate(&self, indices: &[usize], text_len: usize) -> Result<Batch> {
        let n = self.base.len();
        let (base, extra): (Vec<usize>, Vec<usize>) = indices.iter().partition(|&&i| i < n);
        let extra = extra
            .iter()
            .map(|&i| {
                self.included.get(i - n).copied().ok_or_else(|| {
                    Error::Shape(format!(
                        "example index {i} is out of range for {}",
                        self.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut batch = self.base.collate(&base, text_len)?;
        let mut c = self.canaries.collate(&extra, text_len)?;
        c.example_ids = c.example_ids.iter().map(|&j| n + j).collect();
        append(&mut batch, c)?;
        Ok(batch)
    }

    fn max_text_len(&self) -> usize {
        self.base.max_text_len().max(self.canaries.max_text_len())
    }

    fn fingerprint(&self, key: &[u8; 32]) -> String {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(self.base.fingerprint(key).as_bytes());
        h.update(self.canaries.fingerprint(key).as_bytes());
        for i in &self.included {
            h.update(&(*i as u64).to_le_bytes());
        }
        h.finalize().to_hex()[..32].to_string()
    }

    fn identity(&self) -> String {
        let mut h = blake3::Hasher::new();
        for i in &self.included {
            h.update(&(*i as u64).to_le_bytes());
        }
        format!(
            "{}+canaries({}, {})",
            self.base.identity(),
            self.canaries.identity(),
            &h.finalize().to_hex()[..16]
        )
    }
}

/// A data source whose examples' answers are replaced: every loss position of
/// example i gets target `labels[i]` (and the next input token, when it was the
/// old answer, as teacher forcing feeds it).
pub struct Relabeled<'a> {
    inner: &'a dyn DataSource,
    labels: Vec<u32>,
}

impl<'a> Relabeled<'a> {
    /// `inner` with example i answered `labels[i]`.
    pub fn new(inner: &'a dyn DataSource, labels: Vec<u32>) -> Result<Self> {
        if labels.len() != inner.len() {
            return Err(Error::Internal(format!(
                "{} labels for {} examples",
                labels.len(),
                inner.len()
            )));
        }
        Ok(Self { inner, labels })
    }

    /// `inner` with each example answered by a token drawn uniformly from the
    /// answers that occur in `inner`, other than its own (a random wrong answer).
    pub fn random_wrong(inner: &'a dyn DataSource, rng: &mut impl Rng) -> Result<Self> {
        let text_len = inner.max_text_len();
        let mut own = Vec::with_capacity(inner.len());
        let idx: Vec<usize> = (0..inner.len()).collect();
        for chunk in idx.chunks(256) {
            let b = inner.collate(chunk, text_len)?;
            for row in 0..b.size {
                let r = row * b.text_len..(row + 1) * b.text_len;
                let pos = b.loss_mask[r.clone()].iter().position(|&w| w == 1.0);
                own.push(pos.map(|p| b.targets[r.start + p]));
            }
        }
        let mut answers: Vec<u32> = own.iter().flatten().copied().collect();
        answers.sort_unstable();
        answers.dedup();
        if answers.len() < 2 {
            return Err(Error::Config(
                "the canary examples have fewer than two distinct answers, so none can be given a \
                 wrong one; draw more canary examples"
                    .into(),
            ));
        }
        let labels = own
            .iter()
            .map(|o| loop {
                let a = answers[rng.random_range(0..answers.len())];
                if Some(a) != *o {
                    break a;
                }
            })
            .collect();
        Self::new(inner, labels)
    }
}

impl DataSource for Relabeled<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn collate(&self, indices: &[usize], text_len: usize) -> Result<Batch> {
        let mut b = self.inner.collate(indices, text_len)?;
        let t = b.text_len;
        for (row, &i) in indices.iter().enumerate() {
            let label = self.labels[i];
            for p in row * t..(row + 1) * t {
                if b.loss_mask[p] == 1.0 {
                    let old = std::mem::replace(&mut b.targets[p], label);
                    if p + 1 < (row + 1) * t && b.input_ids[p + 1] == old {
                        b.input_ids[p + 1] = label;
                    }
                }
            }
        }
        Ok(b)
    }

    fn max_text_len(&self) -> usize {
        self.inner.max_text_len()
    }

    fn fingerprint(&self, key: &[u8; 32]) -> String {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(self.inner.fingerprint(key).as_bytes());
        for l in &self.labels {
            h.update(&l.to_le_bytes());
        }
        h.finalize().to_hex()[..32].to_string()
    }

    fn identity(&self) -> String {
        let mut h = blake3::Hasher::new();
        for l in &self.labels {
            h.update(&l.to_le_bytes());
        }
        format!(
            "{}+labels({})",
            self.inner.identity(),
            &h.finalize().to_hex()[..16]
        )
    }
}

/// White-box gradient canaries for one audited run: canary j owns one trainable
/// coordinate and, when included (its coin) and sampled in a step (Poisson at the
/// data's rate q, from the injector's own secret stream), adds C·e_j to that
/// step's clipped sum. Also carries the noise factor of the broken variant.
pub(crate) struct Injector {
    /// (parameter id, index) of each canary's coordinate.
    pub coords: Vec<(u32, usize)>,
    /// The coins: whether canary j is in the training set.
    pub included: Vec<bool>,
    /// The Poisson sampling rate q.
    pub rate: f64,
    /// The clip norm C (each canary's gradient has norm exactly C).
    pub clip: f32,
    /// Seed of the per-step sampling stream (secret in a real audit).
    pub key: [u8; 32],
    /// Factor on the noise std (1 unless the broken variant).
    pub noise_scale: f64,
}

impl Injector {
    /// The additions of draw `draw`: every included canary sampled in it.
    pub fn hook(&self, draw: u32) -> AuditHook {
        let mut rng = ChaCha20Rng::from_seed(self.key);
        rng.set_stream(u64::from(draw));
        let inject = self
            .coords
            .iter()
            .zip(&self.included)
            .filter_map(|(&(id, i), &inc)| {
                // Every canary draws, included or not, so the stream does not depend
                // on the coins.
                let sampled = rng.random::<f64>() < self.rate;
                (inc && sampled).then_some((id, i, self.clip))
            })
            .collect();
        AuditHook {
            inject,
            noise_scale: self.noise_scale,
        }
    }
}
