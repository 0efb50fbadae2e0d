//! Caption generation from one image: greedy, beam search, or sampling
//! (nucleus and top-k), with open_clip's logit processors (repetition
//! penalty, minimum length, a stop token), with the decoder's key/value
//! cache or (to measure what it saves) recomputing the whole prefix for
//! every token.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::decoding::DecodingState;
use crate::CocaModel;
use contract::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    Greedy,
    /// Beam search with this many beams; scores are summed log-probabilities
    /// divided by length^0.6 when finished hypotheses are compared.
    Beam(usize),
    /// Sampling at `temperature` from the smallest set of tokens whose
    /// probability reaches `top_p` (nucleus), among the `top_k` most
    /// likely when set, drawn with a seeded generator.
    Sample {
        temperature: f32,
        top_p: f32,
        top_k: Option<usize>,
        seed: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Generation {
    pub strategy: Strategy,
    /// Tokens generated at most (after `<bos>`).
    pub max_len: usize,
    pub bos: u32,
    pub eos: u32,
    /// Keep the decoder's keys and values (false: recompute the prefix).
    pub cache: bool,
    /// The logit of every token the caption already holds is divided by
    /// this (multiplied where negative), as open_clip's and Hugging Face's
    /// `repetition_penalty`; 1: off.
    pub repetition_penalty: f32,
    /// Tokens generated before `<eos>` (or `stop`) may end the caption.
    pub min_len: usize,
    /// A token that ends the caption once generated, kept in it (a full
    /// stop, say), besides `<eos>`.
    pub stop: Option<u32>,
}

impl Generation {
    /// Greedy or another `strategy` without the logit processors: no
    /// repetition penalty, no minimum length, no stop token but `<eos>`.
    pub fn new(strategy: Strategy, max_len: usize, bos: u32, eos: u32) -> Self {
        Self {
            strategy,
            max_len,
            bos,
            eos,
            cache: true,
            repetition_penalty: 1.0,
            min_len: 0,
            stop: None,
        }
    }

    /// The logits of the token after `generated` (the caption so far,
    /// without `<bos>`), as the processors leave them.
    fn process(&self, mut logits: Vec<f32>, generated: &[u32]) -> Vec<f32> {
        if self.repetition_penalty != 1.0 {
            let mut seen: Vec<u32> = generated.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for token in seen {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit = if *logit < 0.0 {
                        *logit * self.repetition_penalty
                    } else {
                        *logit / self.repetition_penalty
                    };
                }
            }
        }
        if generated.len() < self.min_len {
            for token in std::iter::once(self.eos).chain(self.stop) {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        logits
    }
}

/// Length penalty exponent for comparing finished beams (as in GNMT).
const LENGTH_ALPHA: f64 = 0.6;

/// The caption's token ids (without `<bos>`, without `<eos>`) for one
/// image's caption tokens ([1, queries, vision_width]).
pub fn generate<B: Backend>(model: &CocaModel<B>, image_tokens: Tensor<B, 3>, generation: &Generation) -> Vec<u32> {
    let max_len = generation
        .max_len
        .min(model.text_embedding.position.val().dims()[0] - 1);
    match generation.strategy {
        Strategy::Beam(beams) => beam_search(model, image_tokens, generation, beams.max(1), max_len),
        strategy => {
            let mut decoder = Decoder::new(model, image_tokens, generation.cache);
            let mut tokens = vec![generation.bos];
            let mut random = match strategy {
                Strategy::Sample { seed, .. } => Some(SplitMix64::new(seed)),
                _ => None,
            };
            for _ in 0..max_len {
                let logits = decoder.next_logits(&[tokens.clone()]).remove(0);
                let logits = generation.process(logits, &tokens[1..]);
                let next = match (strategy, random.as_mut()) {
                    (
                        Strategy::Sample {
                            temperature,
                            top_p,
                            top_k,
                            ..
                        },
                        Some(random),
                    ) => sample(&logits, temperature, top_p, top_k, random),
                    _ => argmax(&logits),
                };
                if next == generation.eos {
                    break;
                }
                tokens.push(next);
                if Some(next) == generation.stop {
                    break;
                }
            }
            tokens.split_off(1)
        }
    }
}

/// Logits of the next token after each sequence, cached or recomputed.
struct Decoder<'a, B: Backend> {
    model: &'a CocaModel<B>,
    image_tokens: Tensor<B, 3>,
    state: Option<DecodingState<B>>,
    cache: bool,
}

impl<'a, B: Backend> Decoder<'a, B> {
    fn new(model: &'a CocaModel<B>, image_tokens: Tensor<B, 3>, cache: bool) -> Self {
        Self {
            model,
            image_tokens,
            state: None,
            cache,
        }
    }

    /// `sequences`: equal-length token lists, one per batch row of the state.
    fn next_logits(&mut self, sequences: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let rows = sequences.len();
        let device = self.image_tokens.device();
        let [_, queries, width] = self.image_tokens.dims();
        let state = match (&mut self.state, self.cache) {
            (Some(state), true) => state,
            (state, _) => {
                let images = self.image_tokens.clone().expand([rows, queries, width]);
                state.insert(self.model.begin_decoding(images))
            }
        };
        // Cached: only what the state has not seen; otherwise the whole prefix.
        let seen = state.len;
        let new: Vec<i64> = sequences
            .iter()
            .flat_map(|s| s[seen..].iter().map(|&t| i64::from(t)))
            .collect();
        let n = new.len() / rows;
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(new, [rows, n]), &device);
        let logits = self.model.decode(tokens, state);
        let [_, _, vocab] = logits.dims();
        let last = logits.narrow(1, n - 1, 1).reshape([rows, vocab]);
        let values = last.into_data().convert::<f32>().into_vec::<f32>().expect("f32 logits");
        if !self.cache {
            self.state = None;
        }
        values.chunks(vocab).map(<[f32]>::to_vec).collect()
    }

    /// Reorders the cached rows after beam selection.
    fn keep_rows(&mut self, rows: &[usize]) {
        if let Some(state) = &mut self.state {
            let device = self.image_tokens.device();
            let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let len = rows.len();
            state.select(&Tensor::from_data(TensorData::new(rows, [len]), &device));
        }
    }
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

fn log_probabilities(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|l| l - log_sum).collect()
}

fn sample(logits: &[f32], temperature: f32, top_p: f32, top_k: Option<usize>, random: &mut SplitMix64) -> u32 {
    let scaled: Vec<f32> = logits.iter().map(|l| l / temperature.max(1e-6)).collect();
    let probabilities: Vec<f32> = log_probabilities(&scaled).into_iter().map(f32::exp).collect();
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| probabilities[b].total_cmp(&probabilities[a]).then(a.cmp(&b)));
    let mut nucleus = Vec::new();
    let mut mass = 0.0;
    for i in order.into_iter().take(top_k.unwrap_or(usize::MAX).max(1)) {
        nucleus.push(i);
        mass += probabilities[i];
        if mass >= top_p {
            break;
        }
    }
    let mut draw = random.uniform() as f32 * mass;
    for &i in &nucleus {
        draw -= probabilities[i];
        if draw <= 0.0 {
            return i as u32;
        }
    }
    *nucleus.last().expect("the nucleus holds a token") as u32
}

fn beam_search<B: Backend>(
    model: &CocaModel<B>,
    image_tokens: Tensor<B, 3>,
    generation: &Generation,
    beams: usize,
    max_len: usize,
) -> Vec<u32> {
    let mut decoder = Decoder::new(model, image_tokens, generation.cache);
    // (tokens with <bos>, summed log-probability)
    let mut alive: Vec<(Vec<u32>, f64)> = vec![(vec![generation.bos], 0.0)];
    let mut finished: Vec<(Vec<u32>, f64)> = Vec::new();
    let normalized = |tokens: &[u32], score: f64| score / (tokens.len().max(1) as f64).powf(LENGTH_ALPHA);
    for _ in 0..max_len {
        let sequences: Vec<Vec<u32>> = alive.iter().map(|(t, _)| t.clone()).collect();
        let logits = decoder.next_logits(&sequences);
        let mut candidates: Vec<(usize, u32, f64)> = Vec::new();
        for (row, row_logits) in logits.into_iter().enumerate() {
            let log_p = log_probabilities(&generation.process(row_logits, &alive[row].0[1..]));
            let mut order: Vec<usize> = (0..log_p.len()).collect();
            order.sort_by(|&a, &b| log_p[b].total_cmp(&log_p[a]).then(a.cmp(&b)));
            for &token in order.iter().take(beams) {
                candidates.push((row, token as u32, alive[row].1 + f64::from(log_p[token])));
            }
        }
        candidates.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
        let mut next = Vec::new();
        let mut parents = Vec::new();
        for (row, token, score) in candidates {
            if next.len() == beams {
                break;
            }
            let mut tokens = alive[row].0.clone();
            if token == generation.eos {
                finished.push((tokens, score));
            } else if Some(token) == generation.stop {
                tokens.push(token);
                finished.push((tokens, score));
            } else {
                tokens.push(token);
                next.push((tokens, score));
                parents.push(row);
            }
        }
        // Done once no live beam can beat the best finished one.
        let best_finished = finished
            .iter()
            .map(|(t, s)| normalized(t, *s))
            .fold(f64::NEG_INFINITY, f64::max);
        let best_alive = next
            .iter()
            .map(|(t, s)| normalized(t, *s))
            .fold(f64::NEG_INFINITY, f64::max);
        if next.is_empty() || finished.len() >= beams || best_finished > best_alive {
            alive = next;
            break;
        }
        decoder.keep_rows(&parents);
        alive = next;
    }
    finished.extend(alive);
    let (tokens, _) = finished
        .into_iter()
        .max_by(|a, b| normalized(&a.0, a.1).total_cmp(&normalized(&b.0, b.1)))
        .expect("a hypothesis");
    tokens[1..].to_vec()
}
