//! Generated ids -> text pieces for the caller: valid UTF-8 only, and stop sequences cut out.
//! Text that might be the start of a stop sequence is held back until it is known not to be.

use crate::model::{ModelError, StreamDecoder, TextTokenizer};

/// What one new token adds to the visible output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// A stop sequence was completed; `text` ends just before it.
    pub stopped: bool,
}

/// Per-sequence output state.
#[derive(Debug, Clone)]
pub struct TextOutput {
    decoder: StreamDecoder,
    stops: Vec<String>,
    pending: String,
}

impl TextOutput {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            decoder: StreamDecoder::default(),
            stops,
            pending: String::new(),
        }
    }

    /// Call after each generated token with every generated id so far.
    pub fn push(&mut self, tk: &TextTokenizer, ids: &[u32]) -> Result<Piece, ModelError> {
        if let Some(p) = self.decoder.next_piece(tk, ids)? {
            self.pending.push_str(&p);
        }
        Ok(self.take_ready())
    }

    /// Text from the decoder (already valid UTF-8) through the stop filter.
    fn take_ready(&mut self) -> Piece {
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Piece {
                text,
                stopped: true,
            };
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Piece {
            text,
            stopped: false,
        }
    }

    /// Releases whatever is held back (at the end of a sequence not ended by a stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length in bytes of the longest proper suffix of `text` that is a prefix of `stop`,
/// on a character boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let mut o = TextOutput::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for c in chunks {
            o.pending.push_str(c);
            let p = o.take_ready();
            out.push_str(&p.text);
            if p.stopped {
                return (out, true);
            }
        }
        out.push_str(&o.flush());
        (out, false)
    }

    #[test]
    fn stop_sequence_across_pieces_is_cut() {
        assert_eq!(
            feed(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn partial_match_is_released_when_it_fails() {
        assert_eq!(feed(&["END"], &["a E", "Nx"]), ("a ENx".into(), false));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(feed(&["b", "a"], &["xab"]), ("x".into(), true));
    }

    #[test]
    fn suffix_prefix_respects_char_boundaries() {
        assert_eq!(longest_suffix_prefix("aé", "é!"), 2);
        assert_eq!(longest_suffix_prefix("abc", "xyz"), 0);
    }
}
