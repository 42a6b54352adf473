//! Reads PyTorch checkpoints written by `torch.save` (the zip format of torch
//! ≥ 1.6: `<name>/data.pkl` plus one file per storage under `<name>/data/`)
//! without Python: a small pickle machine for the opcodes torch emits, and
//! tensors rebuilt from their storages with `_rebuild_tensor_v2`'s offset,
//! size and stride. Nothing in the pickle is executed: only the globals that
//! torch checkpoints use are understood, and anything else stays an inert
//! value.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::{ModelError, Result};

/// A decoded pickle value.
#[derive(Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A module-level name (`module.name`) the machine does not interpret.
    Global(String),
    /// A call of an uninterpreted global: kept as data, never run.
    Call(Box<Value>, Box<Value>),
    /// A persistent id: torch's storage references.
    Storage(StorageRef),
    Tensor(TensorRef),
}

#[derive(Debug, Clone)]
pub struct StorageRef {
    pub key: String,
    pub kind: Kind,
    pub numel: i64,
}

#[derive(Debug, Clone)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "torch.FloatStorage" => Kind::Float,
        "torch.DoubleStorage" => Kind::Double,
        "torch.HalfStorage" => Kind::Half,
        "torch.BFloat16Storage" => Kind::BFloat16,
        "torch.LongStorage" => Kind::Int64,
        "torch.IntStorage" => Kind::Int,
        "torch.ShortStorage" => Kind::Int16,
        "torch.CharStorage" => Kind::Int8,
        "torch.ByteStorage" => Kind::Uint8,
        "torch.BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn corrupt(message: impl Into<String>) -> ModelError {
    ModelError::Pickle {
        message: message.into(),
    }
}

fn int_of(value: &Value) -> Result<i64> {
    match value {
        Value::Int(number) => Ok(*number),
        other => Err(corrupt(format!("expected an integer, found {other:?}"))),
    }
}

fn ints_of(value: &Value) -> Result<Vec<i64>> {
    match value {
        Value::Tuple(items) | Value::List(items) => items.iter().map(int_of).collect(),
        other => Err(corrupt(format!(
            "expected a tuple of integers, found {other:?}"
        ))),
    }
}

/// Applies a global to its arguments, for the few torch uses.
fn call(function: Value, arguments: Value) -> Result<Value> {
    let Value::Global(name) = &function else {
        return Ok(Value::Call(Box::new(function), Box::new(arguments)));
    };
    let Value::Tuple(mut args) = arguments else {
        return Ok(Value::Call(Box::new(function), Box::new(arguments)));
    };
    match name.as_str() {
        "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" => {
            if args.len() < 4 {
                return Err(corrupt(format!("{name} with {} arguments", args.len())));
            }
            let stride = ints_of(&args[3])?;
            let size = ints_of(&args[2])?;
            let offset = int_of(&args[1])?;
            match args.swap_remove(0) {
                Value::Storage(storage) => Ok(Value::Tensor(TensorRef {
                    storage,
                    offset,
                    size,
                    stride,
                })),
                other => Err(corrupt(format!("{name} on a non-storage {other:?}"))),
            }
        }
        // Parameters are tensors with requires_grad: the tensor is all we need.
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            if args.is_empty() {
                return Err(corrupt(format!("{name} without arguments")));
            }
            Ok(args.swap_remove(0))
        }
        "collections.OrderedDict" => Ok(Value::Dict(Vec::new())),
        // What `torch::pickle_save` (C++) wraps typed containers in:
        // `restore_type_tag(value, "Dict[str, Tensor]")` is the value.
        "torch.jit._pickle.restore_type_tag" => {
            if args.is_empty() {
                return Err(corrupt(format!("{name} without arguments")));
            }
            Ok(args.swap_remove(0))
        }
        _ => Ok(Value::Call(
            Box::new(function),
            Box::new(Value::Tuple(args)),
        )),
    }
}

fn persistent(pid: Value) -> Result<Value> {
    let Value::Tuple(items) = pid else {
        return Err(corrupt(format!("unexpected persistent id {pid:?}")));
    };
    match items.as_slice() {
        [Value::String(tag), Value::Global(type_name), Value::String(key), _location, Value::Int(numel), ..]
            if tag == "storage" =>
        {
            let kind = storage_kind(type_name).ok_or_else(|| ModelError::Unsupported {
                feature: format!("storage type {type_name}"),
            })?;
            Ok(Value::Storage(StorageRef {
                key: key.clone(),
                kind,
                numel: *numel,
            }))
        }
        other => Err(corrupt(format!("unexpected persistent id {other:?}"))),
    }
}

/// Runs the pickle program in `bytes` and returns its result.
pub fn unpickle(bytes: &[u8]) -> Result<Value> {
    let mut machine = Machine {
        reader: Reader { bytes, position: 0 },
        stack: Vec::new(),
        marks: Vec::new(),
        memo: BTreeMap::new(),
        shared: Vec::new(),
    };
    loop {
        let opcode = machine.reader.byte()?;
        if opcode == b'.' {
            return machine
                .stack
                .pop()
                .ok_or_else(|| corrupt("empty stack at STOP"));
        }
        machine.step(opcode)?;
    }
}

/// The pickle machine's state.
struct Machine<'a> {
    reader: Reader<'a>,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: BTreeMap<u32, usize>,
    /// Memoised values are shared in pickles; they are re-created on each
    /// get from their recorded position here, since our values are owned.
    shared: Vec<Value>,
}

impl Machine<'_> {
    fn step(&mut self, opcode: u8) -> Result<()> {
        if let Some(value) = self.literal(opcode)? {
            self.stack.push(value);
            return Ok(());
        }
        match opcode {
            0x80 => {
                self.reader.byte()?; // PROTO n
            }
            0x95 => {
                self.reader.take(8)?; // FRAME
            }
            b'(' => self.marks.push(self.stack.len()),
            b'q' | b'r' | 0x94 | b'h' | b'j' => self.memo(opcode)?,
            b't' | 0x85..=0x87 | b'l' | b'd' => self.collect(opcode)?,
            b's' | b'u' | b'a' | b'e' => self.extend(opcode)?,
            b'R' | 0x81 => {
                let arguments = self.pop("REDUCE without arguments")?;
                let function = self.pop("REDUCE without a callable")?;
                self.stack.push(call(function, arguments)?);
            }
            b'Q' => {
                let pid = self.pop("BINPERSID on an empty stack")?;
                self.stack.push(persistent(pid)?);
            }
            b'b' => {
                // BUILD: object state; torch tensors and dicts need none here.
                self.pop("BUILD on an empty stack")?;
            }
            other => {
                return Err(ModelError::Unsupported {
                    feature: format!(
                        "pickle opcode 0x{other:02x} at byte {}",
                        self.reader.position - 1
                    ),
                })
            }
        }
        Ok(())
    }

    fn pop(&mut self, what: &str) -> Result<Value> {
        self.stack.pop().ok_or_else(|| corrupt(what))
    }

    /// The items since the last MARK.
    fn since_mark(&mut self, what: &str) -> Result<Vec<Value>> {
        let start = self.marks.pop().ok_or_else(|| corrupt(what))?;
        Ok(self.stack.split_off(start))
    }

    /// A value an opcode pushes by itself (constants, numbers, strings,
    /// bytes, globals); `None` for the other opcodes.
    fn literal(&mut self, opcode: u8) -> Result<Option<Value>> {
        let reader = &mut self.reader;
        Ok(Some(match opcode {
            b'}' => Value::Dict(Vec::new()),
            b']' => Value::List(Vec::new()),
            b')' => Value::Tuple(Vec::new()),
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'J' => Value::Int(i64::from(i32::from_le_bytes(reader.array()?))),
            b'K' => Value::Int(i64::from(reader.byte()?)),
            b'M' => Value::Int(i64::from(u16::from_le_bytes(reader.array()?))),
            0x8a => Value::Int(reader.long()?),
            b'G' => Value::Float(f64::from_be_bytes(reader.array()?)),
            b'X' | b'T' => {
                let length = u32::from_le_bytes(reader.array()?) as usize;
                Value::String(reader.string(length)?)
            }
            0x8c | b'U' => {
                let length = usize::from(reader.byte()?);
                Value::String(reader.string(length)?)
            }
            b'B' => {
                let length = u32::from_le_bytes(reader.array()?) as usize;
                Value::Bytes(reader.take(length)?.to_vec())
            }
            b'C' => {
                let length = usize::from(reader.byte()?);
                Value::Bytes(reader.take(length)?.to_vec())
            }
            b'c' => {
                let module = reader.line()?;
                let name = reader.line()?;
                Value::Global(format!("{module}.{name}"))
            }
            0x93 => {
                let name = pop_string(&mut self.stack)?;
                let module = pop_string(&mut self.stack)?;
                Value::Global(format!("{module}.{name}"))
            }
            _ => return Ok(None),
        }))
    }

    /// PUT, BINPUT, MEMOIZE and GET, BINGET.
    fn memo(&mut self, opcode: u8) -> Result<()> {
        let index = match opcode {
            b'q' | b'h' => u32::from(self.reader.byte()?),
            b'r' | b'j' => u32::from_le_bytes(self.reader.array()?),
            _ => self.memo.len() as u32,
        };
        if matches!(opcode, b'h' | b'j') {
            let slot = self
                .memo
                .get(&index)
                .ok_or_else(|| corrupt(format!("memo {index} unset")))?;
            self.stack.push(clone_value(&self.shared[*slot]));
            return Ok(());
        }
        let top = self
            .stack
            .last()
            .ok_or_else(|| corrupt("memoising an empty stack"))?;
        self.memo.insert(index, self.shared.len());
        self.shared.push(clone_value(top));
        Ok(())
    }

    /// TUPLE, TUPLE1-3, LIST and DICT: a new container of stack items.
    fn collect(&mut self, opcode: u8) -> Result<()> {
        let value = match opcode {
            b't' => Value::Tuple(self.since_mark("TUPLE without MARK")?),
            b'l' => Value::List(self.since_mark("LIST without MARK")?),
            b'd' => Value::Dict(pairs(self.since_mark("DICT without MARK")?)?),
            _ => {
                let count = usize::from(opcode - 0x84);
                if self.stack.len() < count {
                    return Err(corrupt("TUPLEn past the stack"));
                }
                Value::Tuple(self.stack.split_off(self.stack.len() - count))
            }
        };
        self.stack.push(value);
        Ok(())
    }

    /// SETITEM, SETITEMS, APPEND and APPENDS: items added to the container
    /// below them.
    fn extend(&mut self, opcode: u8) -> Result<()> {
        match opcode {
            b's' => {
                let value = self.pop("SETITEM without value")?;
                let key = self.pop("SETITEM without key")?;
                match self.stack.last_mut() {
                    Some(Value::Dict(entries)) => entries.push((key, value)),
                    _ => return Err(corrupt("SETITEM on a non-dict")),
                }
            }
            b'u' => {
                let items = pairs(self.since_mark("SETITEMS without MARK")?)?;
                match self.stack.last_mut() {
                    Some(Value::Dict(entries)) => entries.extend(items),
                    _ => return Err(corrupt("SETITEMS on a non-dict")),
                }
            }
            b'a' => {
                let value = self.pop("APPEND without value")?;
                match self.stack.last_mut() {
                    Some(Value::List(items)) => items.push(value),
                    _ => return Err(corrupt("APPEND on a non-list")),
                }
            }
            _ => {
                let values = self.since_mark("APPENDS without MARK")?;
                match self.stack.last_mut() {
                    Some(Value::List(items)) => items.extend(values),
                    _ => return Err(corrupt("APPENDS on a non-list")),
                }
            }
        }
        Ok(())
    }
}

fn pop_string(stack: &mut Vec<Value>) -> Result<String> {
    match stack.pop() {
        Some(Value::String(text)) => Ok(text),
        other => Err(corrupt(format!("expected a string, found {other:?}"))),
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return Err(corrupt("odd number of dict items"));
    }
    let mut iter = items.into_iter();
    let mut out = Vec::new();
    while let (Some(key), Some(value)) = (iter.next(), iter.next()) {
        out.push((key, value));
    }
    Ok(out)
}

/// Structural copy for memo gets (checkpoints memoise storages, tensors
/// and small tuples; copies of those are cheap references).
fn clone_value(value: &Value) -> Value {
    match value {
        Value::None => Value::None,
        Value::Bool(flag) => Value::Bool(*flag),
        Value::Int(number) => Value::Int(*number),
        Value::Float(number) => Value::Float(*number),
        Value::String(text) => Value::String(text.clone()),
        Value::Bytes(bytes) => Value::Bytes(bytes.clone()),
        Value::Tuple(items) => Value::Tuple(items.iter().map(clone_value).collect()),
        Value::List(items) => Value::List(items.iter().map(clone_value).collect()),
        Value::Dict(entries) => Value::Dict(
            entries
                .iter()
                .map(|(key, value)| (clone_value(key), clone_value(value)))
                .collect(),
        ),
        Value::Global(name) => Value::Global(name.clone()),
        Value::Call(function, arguments) => Value::Call(
            Box::new(clone_value(function)),
            Box::new(clone_value(arguments)),
        ),
        Value::Storage(storage) => Value::Storage(storage.clone()),
        Value::Tensor(tensor) => Value::Tensor(tensor.clone()),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8]> {
        let end = self
            .position
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| corrupt(format!("truncated at byte {}", self.position)))?;
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// LONG1: a little-endian two's-complement integer of up to 8 bytes.
    fn long(&mut self) -> Result<i64> {
        let length = usize::from(self.byte()?);
        let raw = self.take(length)?;
        if length > 8 {
            return Err(ModelError::Unsupported {
                feature: "integers wider than 64 bits".into(),
            });
        }
        let mut buffer = if raw.last().is_some_and(|byte| byte & 0x80 != 0) {
            [0xff; 8]
        } else {
            [0; 8]
        };
        buffer[..length].copy_from_slice(raw);
        Ok(i64::from_le_bytes(buffer))
    }

    fn string(&mut self, length: usize) -> Result<String> {
        String::from_utf8(self.take(length)?.to_vec()).map_err(|_| corrupt("string is not UTF-8"))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.position..];
        let end = rest
            .iter()
            .position(|byte| *byte == b'\n')
            .ok_or_else(|| corrupt("unterminated GLOBAL"))?;
        let text = self.string(end)?;
        self.position += 1;
        Ok(text)
    }
}

/// Every tensor of a `torch.save` file, by dotted path: a state dict's keys
/// as they are, and nested dicts (training checkpoints) joined with dots,
/// e.g. `model_state_dict.perceiver.latents`.
pub fn read_torch_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let io_error = |message: String| ModelError::Io {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|error| io_error(error.to_string()))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|error| {
        io_error(format!(
            "not a zip-format torch.save file ({error}); files from torch < 1.6 must be re-saved with a newer torch"
        ))
    })?;
    let names: Vec<String> = archive.file_names().map(String::from).collect();
    let pickle_name = names
        .iter()
        .find(|name| name.ends_with("data.pkl"))
        .ok_or_else(|| io_error("no data.pkl inside; is this a torch.save file?".into()))?
        .clone();
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let mut entry = archive
            .by_name(name)
            .map_err(|error| io_error(format!("{name}: {error}")))?;
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|error| io_error(format!("{name}: {error}")))?;
        Ok(bytes)
    };
    let root = unpickle(&read_entry(&pickle_name)?).map_err(|error| io_error(error.to_string()))?;
    let mut found = Vec::new();
    collect_tensors(&root, "", &mut found);
    let mut storages: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut tensors = Vec::with_capacity(found.len());
    for (name, reference) in found {
        let storage = match storages.get(&reference.storage.key) {
            Some(storage) => storage.shallow_clone(),
            None => {
                let bytes = read_entry(&format!("{prefix}data/{}", reference.storage.key))?;
                let storage = Tensor::from_data_size(
                    &bytes,
                    &[reference.storage.numel],
                    reference.storage.kind,
                );
                storages.insert(reference.storage.key.clone(), storage.shallow_clone());
                storage
            }
        };
        let tensor = storage
            .as_strided(
                reference.size.as_slice(),
                reference.stride.as_slice(),
                Some(reference.offset),
            )
            .contiguous();
        tensors.push((name, tensor));
    }
    Ok(tensors)
}

fn collect_tensors(value: &Value, prefix: &str, out: &mut Vec<(String, TensorRef)>) {
    match value {
        Value::Tensor(tensor) => out.push((prefix.to_string(), tensor.clone())),
        Value::Dict(entries) => {
            for (key, child) in entries {
                let key = match key {
                    Value::String(text) => text.clone(),
                    Value::Int(number) => number.to_string(),
                    _ => continue,
                };
                let path = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                collect_tensors(child, &path, out);
            }
        }
        _ => {}
    }
}
