//! Arrow record batches to Postgres binary `COPY ... FROM STDIN (FORMAT binary)`: the
//! mirror of haul-worker's `decode`, used by the loader.
//!
//! Each stream column is matched with its target column once per chunk ([`plan_column`]):
//! - a column whose Arrow type has a binary form the target type accepts is written in
//!   that form (ints also into a wider target, `real` into `double precision`);
//! - a text column (the display form of `inet`, `money`, `timetz`, unconstrained
//!   `numeric`, ...) bound for a non-text target is written as `text` into a staging
//!   table and cast to the target type by Postgres, with the type's own input function;
//! - anything else is an error naming the column and both types, before any row moves.

use std::fmt::Write as _;

use crate::pg::{
    DATE_INFINITY, DATE_NEG_INFINITY, PG_EPOCH_OFFSET_DAYS, PG_EPOCH_OFFSET_US, TS_INFINITY,
    TS_NEG_INFINITY,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Decimal128Type, Decimal256Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Time64MicrosecondType, TimestampMicrosecondType,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use bytes::{BufMut, Bytes, BytesMut};

/// The 19-byte header of a binary COPY stream (signature, flags, extension length).
pub const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The trailer: a tuple with field count -1.
pub const COPY_TRAILER: &[u8] = &[0xff, 0xff];

/// A target column as the target's catalog describes it.
#[derive(Clone, Debug)]
pub struct TargetColumn {
    pub name: String,
    /// `format_type` of the column's type (what a cast names).
    pub pg_type: String,
    /// The receive function of the column's type (of its base type, for a domain).
    pub recv: String,
    /// For an array type: its element type's oid and receive function.
    pub element: Option<(u32, String)>,
    pub not_null: bool,
    /// Whether its values compare under a collation.
    pub collatable: bool,
}

/// How one column's values are written.
#[derive(Clone, Debug, PartialEq)]
pub enum Enc {
    Bool,
    /// Integers, written with the target's width (2, 4 or 8 bytes); out-of-range values
    /// are an error.
    Int(u8),
    /// `oid`: unsigned 32-bit.
    Oid,
    Float4,
    /// float8, from Float64 or Float32.
    Float8,
    Numeric,
    /// Raw UTF-8: text, varchar, char(n), name, json, enums — and the text staging
    /// columns.
    Text,
    /// A version byte (1), then the text.
    Jsonb,
    Bytea,
    Date,
    Time,
    Timestamp,
    Interval,
    Uuid,
    Array {
        element_oid: u32,
        element: Box<Enc>,
    },
    /// A list of integers as the text of an `int2vector` or `oidvector` (`1 2 3`),
    /// staged and cast: Postgres cannot receive an empty vector in binary.
    VectorText,
    /// An array in Postgres's binary form (from a load-only job), written as it came
    /// with its element type's oid set to `element_oid`: bounds and dimensions are kept.
    /// `array_type` is the built-in type of the bytes (a staging column's type).
    ArrayVerbatim {
        element_oid: u32,
        array_type: &'static str,
    },
}

/// How one column goes into the target.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnPlan {
    pub name: String,
    pub enc: Enc,
    /// `Some(target type)` when the column is written as text (`text[]` for a list) into
    /// a staging table and cast to this type on the way into the target.
    pub cast_to: Option<String>,
}

const TEXT_OID: u32 = 25;

/// Receive functions whose binary input is the value's UTF-8 text.
fn text_like(recv: &str) -> bool {
    matches!(
        recv,
        "textrecv" | "varcharrecv" | "bpcharrecv" | "namerecv" | "json_recv" | "enum_recv"
    )
}

/// Matches a stream column with its target column.
pub fn plan_column(
    field: &arrow_schema::Field,
    target: &TargetColumn,
) -> Result<ColumnPlan, String> {
    let plan = |enc, cast_to| ColumnPlan {
        name: target.name.clone(),
        enc,
        cast_to,
    };
    if let Some(bin) = field
        .metadata()
        .get("haul.pg_array")
        .and_then(|t| crate::pg::ArrayBinary::by_type(t))
    {
        return match &target.element {
            // the same binary form: straight in, under the target's element type
            Some((oid, recv))
                if recv == bin.element_recv || (text_like(recv) && text_like(bin.element_recv)) =>
            {
                Ok(plan(
                    Enc::ArrayVerbatim {
                        element_oid: *oid,
                        array_type: bin.array_type,
                    },
                    None,
                ))
            }
            // another element type (or text): staged as the source's array type and cast
            // by Postgres, which keeps bounds and dimensions
            Some(_) => Ok(plan(
                Enc::ArrayVerbatim {
                    element_oid: bin.element_oid,
                    array_type: bin.array_type,
                },
                Some(target.pg_type.clone()),
            )),
            None if text_like(&target.recv) => Ok(plan(
                Enc::ArrayVerbatim {
                    element_oid: bin.element_oid,
                    array_type: bin.array_type,
                },
                Some(target.pg_type.clone()),
            )),
            None => Err(format!(
                "the stream has an array ({}) but the target column is {}",
                bin.array_type, target.pg_type
            )),
        };
    }
    if let DataType::List(e) = field.data_type()
        && e.data_type().is_integer()
        && matches!(target.recv.as_str(), "int2vectorrecv" | "oidvectorrecv")
    {
        return Ok(plan(Enc::VectorText, Some(target.pg_type.clone())));
    }
    let direct = direct_enc(field.data_type(), &target.recv, target.element.as_ref());
    if let Some(enc) = direct {
        return Ok(plan(enc, None));
    }
    match field.data_type() {
        DataType::Utf8 => Ok(plan(Enc::Text, Some(target.pg_type.clone()))),
        DataType::List(e) if e.data_type() == &DataType::Utf8 && target.element.is_some() => {
            Ok(plan(
                Enc::Array {
                    element_oid: TEXT_OID,
                    element: Box::new(Enc::Text),
                },
                Some(target.pg_type.clone()),
            ))
        }
        other => Err(format!(
            "the stream has {}{} but the target column is {}",
            other,
            field
                .metadata()
                .get("haul.pg_type")
                .map(|t| format!(" (source type {t})"))
                .unwrap_or_default(),
            target.pg_type
        )),
    }
}

fn direct_enc(dt: &DataType, recv: &str, element: Option<&(u32, String)>) -> Option<Enc> {
    Some(match (dt, recv) {
        (DataType::Boolean, "boolrecv") => Enc::Bool,
        (DataType::Int16 | DataType::Int32 | DataType::Int64, "int2recv") => Enc::Int(2),
        (DataType::Int16 | DataType::Int32 | DataType::Int64, "int4recv") => Enc::Int(4),
        (DataType::Int16 | DataType::Int32 | DataType::Int64, "int8recv") => Enc::Int(8),
        (DataType::Int64 | DataType::Int32 | DataType::Int16, "oidrecv") => Enc::Oid,
        (DataType::Float32, "float4recv") => Enc::Float4,
        (DataType::Float32 | DataType::Float64, "float8recv") => Enc::Float8,
        (DataType::Decimal128(..) | DataType::Decimal256(..), "numeric_recv") => Enc::Numeric,
        (DataType::Utf8, r) if text_like(r) => Enc::Text,
        (DataType::Utf8, "jsonb_recv") => Enc::Jsonb,
        (DataType::Binary, "bytearecv") => Enc::Bytea,
        (DataType::Date32, "date_recv") => Enc::Date,
        (DataType::Time64(TimeUnit::Microsecond), "time_recv") => Enc::Time,
        (DataType::Timestamp(TimeUnit::Microsecond, None), "timestamp_recv") => Enc::Timestamp,
        (DataType::Timestamp(TimeUnit::Microsecond, Some(_)), "timestamptz_recv") => Enc::Timestamp,
        (DataType::Struct(f), "interval_recv") if f == &crate::pg::interval_fields() => {
            Enc::Interval
        }
        (DataType::FixedSizeBinary(16), "uuid_recv") => Enc::Uuid,
        (DataType::List(e), "array_recv") => {
            let (oid, erecv) = element?;
            Enc::Array {
                element_oid: *oid,
                element: Box::new(direct_enc(e.data_type(), erecv, None)?),
            }
        }
        _ => return None,
    })
}

/// A value that cannot be written to its target column.
#[derive(Debug, thiserror::Error)]
#[error("column {column:?}, row {row} of the batch: {reason}")]
pub struct EncodeError {
    pub column: String,
    pub row: usize,
    pub reason: String,
}

/// Encodes a batch's rows as binary COPY tuples (no header or trailer), in `plans`
/// order, which matches the batch's columns.
pub fn encode_batch(batch: &RecordBatch, plans: &[ColumnPlan]) -> Result<Bytes, EncodeError> {
    // (not the arrays' memory size: arrays decoded from one IPC message share its whole
    // body, which each of them would count)
    let mut buf = BytesMut::with_capacity(batch.num_rows() * (2 + plans.len() * 12));
    let mut scratch = String::new();
    let cols: Vec<&ArrayRef> = batch.columns().iter().collect();
    for row in 0..batch.num_rows() {
        buf.put_i16(plans.len() as i16);
        for (p, a) in plans.iter().zip(&cols) {
            put_value(&mut buf, &p.enc, a.as_ref(), row, &mut scratch).map_err(|reason| {
                EncodeError {
                    column: p.name.clone(),
                    row,
                    reason,
                }
            })?;
        }
    }
    Ok(buf.freeze())
}

/// Writes one field: its length, then its bytes (length -1 for NULL).
fn put_value(
    buf: &mut BytesMut,
    enc: &Enc,
    a: &dyn Array,
    i: usize,
    scratch: &mut String,
) -> Result<(), String> {
    if a.is_null(i) {
        buf.put_i32(-1);
        return Ok(());
    }
    match enc {
        Enc::Bool => {
            buf.put_i32(1);
            buf.put_u8(a.as_boolean().value(i) as u8);
        }
        Enc::Int(width) => {
            let v = int_value(a, i)?;
            match width {
                2 => {
                    let v =
                        i16::try_from(v).map_err(|_| format!("{v} is out of smallint range"))?;
                    buf.put_i32(2);
                    buf.put_i16(v);
                }
                4 => {
                    let v = i32::try_from(v).map_err(|_| format!("{v} is out of integer range"))?;
                    buf.put_i32(4);
                    buf.put_i32(v);
                }
                _ => {
                    buf.put_i32(8);
                    buf.put_i64(v);
                }
            }
        }
        Enc::Oid => {
            let v = int_value(a, i)?;
            let v = u32::try_from(v).map_err(|_| format!("{v} is out of oid range"))?;
            buf.put_i32(4);
            buf.put_u32(v);
        }
        Enc::Float4 => {
            buf.put_i32(4);
            buf.put_f32(a.as_primitive::<Float32Type>().value(i));
        }
        Enc::Float8 => {
            let v = match a.data_type() {
                DataType::Float32 => a.as_primitive::<Float32Type>().value(i) as f64,
                _ => a.as_primitive::<Float64Type>().value(i),
            };
            buf.put_i32(8);
            buf.put_f64(v);
        }
        Enc::Numeric => {
            scratch.clear();
            let scale = match a.data_type() {
                DataType::Decimal128(_, s) => {
                    let _ = write!(scratch, "{}", a.as_primitive::<Decimal128Type>().value(i));
                    *s
                }
                DataType::Decimal256(_, s) => {
                    let _ = write!(scratch, "{}", a.as_primitive::<Decimal256Type>().value(i));
                    *s
                }
                other => return Err(format!("{other} is not a decimal")),
            };
            put_numeric(buf, scratch, scale);
        }
        Enc::Text => {
            let s = a.as_string::<i32>().value(i);
            buf.put_i32(len32(s.len())?);
            buf.put_slice(s.as_bytes());
        }
        Enc::VectorText => {
            use std::fmt::Write;
            let list = a.as_list::<i32>();
            let values = list.values();
            scratch.clear();
            let offsets = list.value_offsets();
            for j in offsets[i] as usize..offsets[i + 1] as usize {
                if values.is_null(j) {
                    return Err("a NULL element: a vector holds none".into());
                }
                if !scratch.is_empty() {
                    scratch.push(' ');
                }
                let _ = write!(scratch, "{}", int_value(values.as_ref(), j)?);
            }
            buf.put_i32(len32(scratch.len())?);
            buf.put_slice(scratch.as_bytes());
        }
        Enc::Jsonb => {
            let s = a.as_string::<i32>().value(i);
            buf.put_i32(len32(s.len() + 1)?);
            buf.put_u8(1);
            buf.put_slice(s.as_bytes());
        }
        Enc::Bytea => {
            let b = a.as_binary::<i32>().value(i);
            buf.put_i32(len32(b.len())?);
            buf.put_slice(b);
        }
        Enc::Date => {
            let d = a.as_primitive::<Date32Type>().value(i);
            let pg = match d {
                DATE_INFINITY => i32::MAX,
                // (and Postgres's own marker, which earlier builds of haul wrote)
                DATE_NEG_INFINITY | i32::MIN => i32::MIN,
                d => d
                    .checked_sub(PG_EPOCH_OFFSET_DAYS)
                    .ok_or_else(|| format!("date {d} is out of Postgres's range"))?,
            };
            buf.put_i32(4);
            buf.put_i32(pg);
        }
        Enc::Time => {
            buf.put_i32(8);
            buf.put_i64(a.as_primitive::<Time64MicrosecondType>().value(i));
        }
        Enc::Timestamp => {
            let t = a.as_primitive::<TimestampMicrosecondType>().value(i);
            let pg = match t {
                TS_INFINITY => i64::MAX,
                TS_NEG_INFINITY | i64::MIN => i64::MIN,
                t => t
                    .checked_sub(PG_EPOCH_OFFSET_US)
                    .ok_or_else(|| format!("timestamp {t} is out of Postgres's range"))?,
            };
            buf.put_i32(8);
            buf.put_i64(pg);
        }
        Enc::Interval => {
            let s = a.as_struct();
            let months = s.column(0).as_primitive::<Int32Type>().value(i);
            let days = s.column(1).as_primitive::<Int32Type>().value(i);
            let micros = s.column(2).as_primitive::<Int64Type>().value(i);
            buf.put_i32(16);
            buf.put_i64(micros);
            buf.put_i32(days);
            buf.put_i32(months);
        }
        Enc::Uuid => {
            let b = a.as_fixed_size_binary().value(i);
            buf.put_i32(16);
            buf.put_slice(b);
        }
        Enc::ArrayVerbatim { element_oid, .. } => {
            // ndim, has-nulls flag, element oid, then dimensions and elements
            let b = a.as_binary::<i32>().value(i);
            if b.len() < 12 {
                return Err(format!("a {}-byte array value", b.len()));
            }
            buf.put_i32(len32(b.len())?);
            buf.put_slice(&b[..8]);
            buf.put_u32(*element_oid);
            buf.put_slice(&b[12..]);
        }
        Enc::Array {
            element_oid,
            element,
        } => {
            let list = a.as_list::<i32>();
            let values = list.values();
            let (start, end) = (
                list.value_offsets()[i] as usize,
                list.value_offsets()[i + 1] as usize,
            );
            let len_at = buf.len();
            buf.put_i32(0); // the length, filled in below
            let n = end - start;
            buf.put_i32(if n == 0 { 0 } else { 1 });
            buf.put_i32((start..end).any(|j| values.is_null(j)) as i32);
            buf.put_u32(*element_oid);
            if n > 0 {
                buf.put_i32(len32(n)?);
                buf.put_i32(1);
            }
            for j in start..end {
                put_value(buf, element, values.as_ref(), j, scratch)?;
            }
            let len = len32(buf.len() - len_at - 4)?;
            buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        }
    }
    Ok(())
}

fn int_value(a: &dyn Array, i: usize) -> Result<i64, String> {
    Ok(match a.data_type() {
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i) as i64,
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i) as i64,
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i),
        other => return Err(format!("{other} is not an integer")),
    })
}

fn len32(n: usize) -> Result<i32, String> {
    i32::try_from(n).map_err(|_| format!("a value of {n} bytes is over Postgres's 1 GiB limit"))
}

/// Writes a numeric given the decimal digits of its unscaled value (with a leading `-`
/// when negative) and its scale: Postgres's base-10000 form.
fn put_numeric(buf: &mut BytesMut, unscaled: &str, scale: i8) {
    let (negative, digits) = match unscaled.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, unscaled),
    };
    let digits = digits.as_bytes();
    // A negative scale means trailing zeros the value does not carry.
    let (zeros, scale) = if scale < 0 {
        ((-scale) as usize, 0usize)
    } else {
        (0, scale as usize)
    };
    let total = digits.len() + zeros;
    let digit = |k: isize| -> u16 {
        // k-th decimal digit of the unscaled value counted from the left, 0 outside
        if k < 0 || k as usize >= total {
            0
        } else if (k as usize) < digits.len() {
            (digits[k as usize] - b'0') as u16
        } else {
            0
        }
    };
    // Place the decimal point: integer digits are [0, total - scale).
    let int_len = total as isize - scale as isize;
    // Base-10000 groups aligned on the decimal point.
    let int_groups = if int_len > 0 { (int_len + 3) / 4 } else { 0 };
    let frac_groups = (scale as isize + 3) / 4;
    let first = int_len - int_groups * 4; // decimal index where the first group starts
    let mut groups: Vec<u16> = Vec::with_capacity((int_groups + frac_groups) as usize);
    for g in 0..(int_groups + frac_groups) {
        let base = first + g * 4;
        let v = digit(base) * 1000 + digit(base + 1) * 100 + digit(base + 2) * 10 + digit(base + 3);
        groups.push(v);
    }
    let mut weight = int_groups as i16 - 1;
    let lead = groups.iter().take_while(|g| **g == 0).count();
    let trail = groups[lead..].iter().rev().take_while(|g| **g == 0).count();
    let kept = &groups[lead..groups.len() - trail];
    weight -= lead as i16;
    if kept.is_empty() {
        weight = 0;
    }
    buf.put_i32(8 + 2 * kept.len() as i32);
    buf.put_i16(kept.len() as i16);
    buf.put_i16(weight);
    buf.put_u16(if negative && !kept.is_empty() {
        0x4000
    } else {
        0
    });
    buf.put_u16(scale as u16);
    for g in kept {
        buf.put_u16(*g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(unscaled: &str, scale: i8) -> Vec<u8> {
        let mut b = BytesMut::new();
        put_numeric(&mut b, unscaled, scale);
        b.to_vec()
    }

    fn words(v: &[i16]) -> Vec<u8> {
        v.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    #[test]
    fn numerics_match_postgres_binary_form() {
        // 12345.67 = 1|2345|6700, weight 1, dscale 2
        let mut want = 14i32.to_be_bytes().to_vec();
        want.extend(words(&[3, 1, 0, 2, 1, 2345, 6700]));
        assert_eq!(numeric("1234567", 2), want);
        // -0.05 = 0500 at weight -1
        let mut want = 10i32.to_be_bytes().to_vec();
        want.extend(words(&[1, -1, 0x4000, 2, 500]));
        assert_eq!(numeric("-5", 2), want);
        // 0 with scale 3: no digits
        let mut want = 8i32.to_be_bytes().to_vec();
        want.extend(words(&[0, 0, 0, 3]));
        assert_eq!(numeric("0", 3), want);
        // 10000 = 1 at weight 1
        let mut want = 10i32.to_be_bytes().to_vec();
        want.extend(words(&[1, 1, 0, 0, 1]));
        assert_eq!(numeric("10000", 0), want);
        // 12e3 with scale -3: 12000 = 1|2000
        let mut want = 12i32.to_be_bytes().to_vec();
        want.extend(words(&[2, 1, 0, 0, 1, 2000]));
        assert_eq!(numeric("12", -3), want);
    }
}
