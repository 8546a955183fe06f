//! Stop strings as a stopping criterion, matched on decoded text across token boundaries.

/// Stops a row when a token completes one of the strings (`transformers`' `StopStringCriteria`):
/// the match may span any number of tokens, and the completing token may run past the end of
/// the string.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    strings: Vec<String>,
}

impl StopStrings {
    /// Stops on any of `strings` (empty strings are ignored).
    pub fn new(strings: Vec<String>) -> Self {
        Self {
            strings: strings.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// True when there is nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }

    /// The stop string completed by the newest token, if any: `before` is the decoded text
    /// before it, `after` the decoded text with it. Only matches that end in the part of `after`
    /// that is new count (decoding may rewrite the end of `before`, e.g. a half UTF-8 character).
    pub fn completed<'s>(&'s self, before: &str, after: &str) -> Option<&'s str> {
        let common = common_prefix(before, after);
        self.strings
            .iter()
            .find(|s| {
                let mut lo = common.saturating_sub(s.len() - 1);
                while !after.is_char_boundary(lo) {
                    lo -= 1;
                }
                after[lo..]
                    .match_indices(s.as_str())
                    .any(|(i, m)| lo + i + m.len() > common)
            })
            .map(String::as_str)
    }
}

/// Length in bytes of the longest common prefix that ends on a character boundary of both.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !(a.is_char_boundary(n) && b.is_char_boundary(n)) {
        n -= 1;
    }
    n
}
