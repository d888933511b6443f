//! Why a row has no image: one vocabulary for every input (a folder's files, encoded bytes in
//! a Binary column, image structs from Spark or Parquet) and every place a reason shows up
//! (`image_error`, a network stage's `errorCol`, its metrics' null-row counts, Python, Spark).
//! A reason reads `<kind>: <detail>`, e.g. `truncated: unexpected end of file`.

use std::fmt;

/// The kind of a row's problem: a short phrase, counted in the metrics' null rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    /// The input value itself is null.
    NullInput,
    /// Zero bytes.
    Empty,
    /// Bytes of no format the decoder reads.
    UnsupportedFormat,
    /// An image cut short.
    Truncated,
    /// Larger than [`super::DecodeLimits`] (pixels per side or decoded bytes): a bomb, or a
    /// struct too big to take.
    OverLimits,
    /// Bytes of a known format that do not decode.
    Undecodable,
    /// A struct whose fields disagree (or Spark's row for a file it could not decode).
    InvalidStruct,
    /// An image the model's preprocessing cannot take (e.g. too extreme an aspect ratio).
    DoesNotFit,
}

impl ProblemKind {
    const ALL: [ProblemKind; 8] = [
        ProblemKind::NullInput,
        ProblemKind::Empty,
        ProblemKind::UnsupportedFormat,
        ProblemKind::Truncated,
        ProblemKind::OverLimits,
        ProblemKind::Undecodable,
        ProblemKind::InvalidStruct,
        ProblemKind::DoesNotFit,
    ];

    /// The kind's words, as reasons start with them and the metrics count them.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::NullInput => "null input",
            ProblemKind::Empty => "empty",
            ProblemKind::UnsupportedFormat => "unsupported format",
            ProblemKind::Truncated => "truncated",
            ProblemKind::OverLimits => "over the decode limits",
            ProblemKind::Undecodable => "undecodable",
            ProblemKind::InvalidStruct => "invalid image struct",
            ProblemKind::DoesNotFit => "does not fit the input",
        }
    }

    /// The kind a reason starts with (`<kind>: ...`), if it is one of ours.
    pub fn of_reason(reason: &str) -> Option<ProblemKind> {
        Self::ALL.into_iter().find(|k| {
            reason
                .strip_prefix(k.as_str())
                .is_some_and(|rest| rest.starts_with(':'))
        })
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a row has no image: its kind and a detail for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageProblem {
    pub kind: ProblemKind,
    pub detail: String,
}

impl ImageProblem {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        ImageProblem {
            kind,
            detail: detail.into(),
        }
    }

    /// A reason as written (`<kind>: <detail>`), e.g. read back from an `image_error` column;
    /// text that does not start with a kind of ours is kept whole as an undecodable image's.
    pub fn from_reason(reason: &str) -> Self {
        match ProblemKind::of_reason(reason) {
            Some(kind) => {
                let detail = reason[kind.as_str().len() + 1..].trim_start();
                ImageProblem::new(kind, detail)
            }
            None => ImageProblem::new(ProblemKind::Undecodable, reason),
        }
    }
}

impl fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

impl From<ImageProblem> for String {
    fn from(problem: ImageProblem) -> String {
        problem.to_string()
    }
}

impl std::error::Error for ImageProblem {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_reads_back_as_its_kind_and_detail() {
        for kind in ProblemKind::ALL {
            let problem = ImageProblem::new(kind, "why: because");
            assert_eq!(ImageProblem::from_reason(&problem.to_string()), problem);
        }
        let other = ImageProblem::from_reason("emptyish: no");
        assert_eq!(other.kind, ProblemKind::Undecodable);
        assert_eq!(other.detail, "emptyish: no");
    }
}
