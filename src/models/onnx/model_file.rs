//! Checks on an untrusted `.onnx` file before ONNX Runtime opens it. The file is a protobuf
//! `ModelProto`; this walks the parts that make ONNX Runtime allocate memory or open other
//! files — every tensor's dims (initializers, `Constant` attributes, sparse tensors, subgraphs,
//! functions) and every external-data location — and refuses what is malformed, absurdly large
//! or points outside the model's folder. Nothing else is interpreted.

use std::path::{Component, Path, PathBuf};

/// The most bytes one tensor may declare (a model file may be large, a tensor of terabytes is
/// not a model).
const MAX_TENSOR_BYTES: u64 = 16 << 30;
/// The deepest nesting of subgraphs followed.
const MAX_DEPTH: usize = 32;

/// What the check found: the external-data files the model reads (inside its folder).
#[derive(Debug, Default)]
pub(crate) struct ModelFileFacts {
    pub external_files: Vec<PathBuf>,
}

/// Checks `bytes`, the contents of the model file in `folder`.
pub(crate) fn check(bytes: &[u8], folder: &Path) -> Result<ModelFileFacts, String> {
    let mut walk = Walk {
        folder,
        facts: ModelFileFacts::default(),
    };
    let mut has_graph = false;
    for field in Fields::new(bytes) {
        let field = field?;
        match (field.number, field.value) {
            (7, Value::Bytes(graph)) => {
                has_graph = true;
                walk.graph(graph, 0)?;
            }
            (25, Value::Bytes(function)) => walk.function(function, 0)?,
            _ => {}
        }
    }
    if !has_graph {
        return Err("not a valid ONNX file: it holds no graph".into());
    }
    Ok(walk.facts)
}

struct Walk<'a> {
    folder: &'a Path,
    facts: ModelFileFacts,
}

impl Walk<'_> {
    fn graph(&mut self, bytes: &[u8], depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("subgraphs nested over {MAX_DEPTH} deep"));
        }
        for field in Fields::new(bytes) {
            let field = field?;
            match (field.number, field.value) {
                (1, Value::Bytes(node)) => self.node(node, depth)?,
                (5, Value::Bytes(tensor)) => self.tensor(tensor)?,
                (15, Value::Bytes(sparse)) => self.sparse(sparse)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn function(&mut self, bytes: &[u8], depth: usize) -> Result<(), String> {
        each_message(bytes, 7, |node| self.node(node, depth))
    }

    fn node(&mut self, bytes: &[u8], depth: usize) -> Result<(), String> {
        each_message(bytes, 5, |attribute| self.attribute(attribute, depth))
    }

    fn attribute(&mut self, bytes: &[u8], depth: usize) -> Result<(), String> {
        for field in Fields::new(bytes) {
            let field = field?;
            match (field.number, field.value) {
                (5 | 10, Value::Bytes(tensor)) => self.tensor(tensor)?,
                (6 | 11, Value::Bytes(graph)) => self.graph(graph, depth + 1)?,
                (22 | 23, Value::Bytes(sparse)) => self.sparse(sparse)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn sparse(&mut self, bytes: &[u8]) -> Result<(), String> {
        let mut dims = Vec::new();
        for field in Fields::new(bytes) {
            let field = field?;
            match (field.number, field.value) {
                (1 | 2, Value::Bytes(tensor)) => self.tensor(tensor)?,
                (3, value) => value.int64s(&mut dims)?,
                _ => {}
            }
        }
        tensor_bytes("a sparse tensor", &dims, 1).map(|_| ())
    }

    fn tensor(&mut self, bytes: &[u8]) -> Result<(), String> {
        let (mut dims, mut data_type, mut name) = (Vec::new(), 0, String::new());
        let mut locations = Vec::new();
        for field in Fields::new(bytes) {
            let field = field?;
            match (field.number, field.value) {
                (1, value) => value.int64s(&mut dims)?,
                (2, Value::Varint(t)) => data_type = t,
                (8, Value::Bytes(n)) => name = String::from_utf8_lossy(n).into_owned(),
                (13, Value::Bytes(entry)) => {
                    if let Some(location) = location_entry(entry)? {
                        locations.push(location);
                    }
                }
                _ => {}
            }
        }
        let what = format!("tensor `{name}`");
        tensor_bytes(&what, &dims, element_size(data_type))?;
        for location in locations {
            let file = inside(self.folder, &location)
                .map_err(|e| format!("{what} keeps its data in `{location}`: {e}"))?;
            if !self.facts.external_files.contains(&file) {
                self.facts.external_files.push(file);
            }
        }
        Ok(())
    }
}

/// Calls `f` on each length-delimited field `number` of a message.
fn each_message(
    bytes: &[u8],
    number: u64,
    mut f: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    for field in Fields::new(bytes) {
        if let Field {
            number: n,
            value: Value::Bytes(message),
        } = field?
            && n == number
        {
            f(message)?;
        }
    }
    Ok(())
}

/// The `location` of an external-data entry (`StringStringEntryProto`), if that is its key.
fn location_entry(bytes: &[u8]) -> Result<Option<String>, String> {
    let (mut key, mut value) = (None, None);
    for field in Fields::new(bytes) {
        let field = field?;
        match (field.number, field.value) {
            (1, Value::Bytes(k)) => key = Some(k),
            (2, Value::Bytes(v)) => value = Some(v),
            _ => {}
        }
    }
    Ok((key == Some(b"location".as_slice()))
        .then(|| String::from_utf8_lossy(value.unwrap_or_default()).into_owned()))
}

/// `location` resolved in `folder`, if it names a file there (no absolute path, no `..`, no
/// link leading out); the file is not opened.
fn inside(folder: &Path, location: &str) -> Result<PathBuf, String> {
    let relative = Path::new(location);
    if location.is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err("external data must be a file in the model's folder".into());
    }
    let path = folder.join(relative);
    let real = path
        .canonicalize()
        .map_err(|e| format!("cannot find {} ({e})", path.display()))?;
    let root = folder
        .canonicalize()
        .map_err(|e| format!("cannot resolve the model's folder ({e})"))?;
    if !real.starts_with(&root) {
        return Err(format!(
            "{} leads outside the model's folder (to {})",
            path.display(),
            real.display()
        ));
    }
    Ok(real)
}

/// Bytes of one element of ONNX data type `t` (`TensorProto.DataType`).
fn element_size(t: u64) -> u64 {
    match t {
        11 | 7 | 13 | 14 => 8,
        15 => 16,
        1 | 6 | 12 => 4,
        4 | 5 | 10 | 16 => 2,
        _ => 1,
    }
}

/// The bytes a tensor of `dims` declares, refused when negative, overflowing or over
/// [`MAX_TENSOR_BYTES`].
fn tensor_bytes(what: &str, dims: &[i64], element: u64) -> Result<u64, String> {
    let shape = || {
        dims.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join("x")
    };
    let mut values: u64 = 1;
    for &d in dims {
        let d = u64::try_from(d).map_err(|_| format!("{what} has a negative dim ({})", shape()))?;
        values = values
            .checked_mul(d)
            .ok_or_else(|| format!("{what} declares {} values: too many", shape()))?;
    }
    let bytes = values.saturating_mul(element);
    if bytes > MAX_TENSOR_BYTES {
        return Err(format!(
            "{what} declares {} values ({bytes} bytes), over the {MAX_TENSOR_BYTES}-byte limit for one tensor",
            shape()
        ));
    }
    Ok(bytes)
}

/// A protobuf field's value (groups, long deprecated, are refused).
enum Value<'a> {
    Varint(u64),
    Fixed,
    Bytes(&'a [u8]),
}

impl Value<'_> {
    /// Appends a repeated int64 field's values (packed or not).
    fn int64s(self, out: &mut Vec<i64>) -> Result<(), String> {
        match self {
            Value::Varint(v) => out.push(v as i64),
            Value::Bytes(mut packed) => {
                while !packed.is_empty() {
                    let (v, used) = varint(packed)?;
                    out.push(v as i64);
                    packed = &packed[used..];
                }
            }
            Value::Fixed => return Err("malformed protobuf: a dim is not an integer".into()),
        }
        Ok(())
    }
}

struct Field<'a> {
    number: u64,
    value: Value<'a>,
}

/// The fields of one protobuf message, in order; a malformed or truncated message ends with an
/// error.
struct Fields<'a> {
    bytes: &'a [u8],
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields {
            bytes,
            failed: false,
        }
    }

    fn next_field(&mut self) -> Result<Field<'a>, String> {
        let (key, used) = varint(self.bytes)?;
        let rest = &self.bytes[used..];
        let (value, used) = match key & 7 {
            0 => {
                let (v, n) = varint(rest)?;
                (Value::Varint(v), n)
            }
            1 if rest.len() >= 8 => (Value::Fixed, 8),
            5 if rest.len() >= 4 => (Value::Fixed, 4),
            2 => {
                let (len, n) = varint(rest)?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|len| n.checked_add(len))
                    .filter(|&end| end <= rest.len())
                    .ok_or("truncated or malformed (a field runs past the end of the file)")?;
                (Value::Bytes(&rest[n..end]), end)
            }
            1 | 5 => return Err("truncated (the file ends inside a field)".into()),
            t => return Err(format!("malformed protobuf (wire type {t})")),
        };
        self.bytes = &rest[used..];
        Ok(Field {
            number: key >> 3,
            value,
        })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.bytes.is_empty() {
            return None;
        }
        let field = self.next_field();
        self.failed = field.is_err();
        Some(field.map_err(|e| format!("not a valid ONNX file: {e}")))
    }
}

/// A protobuf varint and the bytes it took.
fn varint(bytes: &[u8]) -> Result<(u64, usize), String> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err("truncated or malformed (a bad varint)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-delimited field.
    fn field(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn refuses_absurd_dims_and_outside_locations() {
        let dims = [1u8 << 3, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]; // 2^42
        let tensor = [dims.as_slice(), &[2 << 3, 1]].concat();
        let model = field(7, &field(5, &tensor));
        let e = check(&model, Path::new(".")).unwrap_err();
        assert!(e.contains("over the"), "{e}");

        let entry = [field(1, b"location"), field(2, b"../x.bin")].concat();
        let model = field(7, &field(5, &field(13, &entry)));
        let e = check(&model, Path::new(".")).unwrap_err();
        assert!(e.contains("model's folder"), "{e}");

        assert!(check(&[0x3a, 0x7f, 1], Path::new(".")).is_err()); // truncated
        assert!(check(&field(1, b"x"), Path::new(".")).is_err()); // no graph
        assert!(check(&field(7, b""), Path::new(".")).is_ok());
    }
}
