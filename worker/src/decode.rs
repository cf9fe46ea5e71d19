//! Binary `COPY ... TO STDOUT (FORMAT binary)` → Arrow record batches.
//!
//! Bytes arrive in arbitrary pieces; a tuple is appended to the column builders only once
//! it is complete, so a split never leaves a half-appended row. A batch is cut when it
//! reaches `batch_rows` rows or `batch_bytes` source bytes, whichever comes first, so
//! memory is bounded by the batch size whatever the row width.

use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Decimal256Builder,
    FixedSizeBinaryBuilder, Float32Builder, Float64Builder, Int16Builder, Int32Builder,
    Int64Builder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::{NullBufferBuilder, OffsetBuffer, i256};
use arrow_schema::{DataType, FieldRef, SchemaRef};
use bytes::{Buf, BytesMut};
use haul_shared::pg::{
    DATE_INFINITY, DATE_NEG_INFINITY, PG_EPOCH_OFFSET_DAYS, PG_EPOCH_OFFSET_US, PgKind,
    SourceError, TS_INFINITY, TS_NEG_INFINITY, TableInfo, interval_fields,
};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const HEADER_LEN: usize = SIGNATURE.len() + 8;

/// Streaming decoder for one COPY.
pub struct CopyDecoder {
    schema: SchemaRef,
    names: Vec<String>,
    kinds: Vec<PgKind>,
    cols: Vec<Col>,
    carry: BytesMut,
    header_seen: bool,
    done: bool,
    rows: usize,
    bytes: usize,
    batch_rows: usize,
    batch_bytes: usize,
}

impl CopyDecoder {
    pub fn new(table: &TableInfo, batch_rows: usize, batch_bytes: usize) -> Self {
        let schema = Arc::new(table.arrow_schema());
        let cols = table
            .columns
            .iter()
            .map(|c| Col::new(&c.kind, batch_rows, 0))
            .collect();
        Self {
            schema,
            names: table.columns.iter().map(|c| c.name.clone()).collect(),
            kinds: table.columns.iter().map(|c| c.kind.clone()).collect(),
            cols,
            carry: BytesMut::new(),
            header_seen: false,
            done: false,
            rows: 0,
            bytes: 0,
            batch_rows: batch_rows.max(1),
            batch_bytes: batch_bytes.max(1),
        }
    }

    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// Feeds one piece of the stream; completed batches are pushed to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<RecordBatch>) -> Result<(), SourceError> {
        if self.carry.is_empty() {
            let used = self.consume(data, out)?;
            self.carry.extend_from_slice(&data[used..]);
        } else {
            self.carry.extend_from_slice(data);
            let carry = std::mem::take(&mut self.carry);
            let used = self.consume(&carry, out)?;
            self.carry = carry;
            self.carry.advance(used);
        }
        Ok(())
    }

    /// Ends the stream: the last (partial) batch, checking the stream ended cleanly.
    pub fn finish(mut self) -> Result<Option<RecordBatch>, SourceError> {
        if !self.done || !self.carry.is_empty() {
            return Err(self.error("<stream>", "COPY stream ended mid-row or without a trailer"));
        }
        if self.rows == 0 {
            return Ok(None);
        }
        self.flush().map(Some)
    }

    fn error(&self, column: &str, reason: impl Into<String>) -> SourceError {
        SourceError::Decode {
            column: column.to_owned(),
            reason: reason.into(),
        }
    }

    /// Decodes every complete tuple in `buf`; returns how many bytes it used.
    fn consume(&mut self, buf: &[u8], out: &mut Vec<RecordBatch>) -> Result<usize, SourceError> {
        let mut pos = 0;
        if !self.header_seen {
            if buf.len() < HEADER_LEN {
                return Ok(0);
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                return Err(self.error("<stream>", "not a binary COPY stream"));
            }
            let ext = u32::from_be_bytes(buf[15..19].try_into().expect("4 bytes")) as usize;
            if buf.len() < HEADER_LEN + ext {
                return Ok(0);
            }
            pos = HEADER_LEN + ext;
            self.header_seen = true;
        }
        let ncols = self.cols.len();
        while pos + 2 <= buf.len() && !self.done {
            let nfields = i16::from_be_bytes([buf[pos], buf[pos + 1]]);
            if nfields == -1 {
                self.done = true;
                pos += 2;
                break;
            }
            if nfields as usize != ncols {
                return Err(self.error(
                    "<stream>",
                    format!("tuple has {nfields} fields, expected {ncols}"),
                ));
            }
            // first pass: is the whole tuple here?
            let mut p = pos + 2;
            let mut complete = true;
            for _ in 0..ncols {
                if p + 4 > buf.len() {
                    complete = false;
                    break;
                }
                let len = i32::from_be_bytes(buf[p..p + 4].try_into().expect("4 bytes"));
                p += 4 + len.max(0) as usize;
                if p > buf.len() {
                    complete = false;
                    break;
                }
            }
            if !complete {
                break;
            }
            // second pass: append
            let mut p = pos + 2;
            for i in 0..ncols {
                let len = i32::from_be_bytes(buf[p..p + 4].try_into().expect("4 bytes"));
                p += 4;
                if len < 0 {
                    self.cols[i].append_null();
                } else {
                    let v = &buf[p..p + len as usize];
                    p += len as usize;
                    if let Err(reason) = self.cols[i].append(v) {
                        return Err(self.error(&self.names[i], reason));
                    }
                }
            }
            self.bytes += p - pos;
            pos = p;
            self.rows += 1;
            if self.rows >= self.batch_rows || self.bytes >= self.batch_bytes {
                out.push(self.flush()?);
            }
        }
        Ok(pos)
    }

    fn flush(&mut self) -> Result<RecordBatch, SourceError> {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.cols.len());
        for (i, c) in self.cols.iter_mut().enumerate() {
            let value_bytes = c.value_bytes();
            let a = c.finish().map_err(|reason| SourceError::Decode {
                column: self.names[i].clone(),
                reason,
            })?;
            // a finished builder is left empty and would regrow by doubling, a copy of
            // its data each time: the next batch's builders are sized like this one's
            *c = Col::new(&self.kinds[i], self.rows, value_bytes + value_bytes / 16);
            arrays.push(a);
        }
        self.rows = 0;
        self.bytes = 0;
        RecordBatch::try_new(Arc::clone(&self.schema), arrays)
            .map_err(|e| self.error("<batch>", e.to_string()))
    }
}

fn be_i16(v: &[u8]) -> Result<i16, String> {
    Ok(i16::from_be_bytes(v.try_into().map_err(|_| bad_len(v, 2))?))
}
fn be_i32(v: &[u8]) -> Result<i32, String> {
    Ok(i32::from_be_bytes(v.try_into().map_err(|_| bad_len(v, 4))?))
}
fn be_i64(v: &[u8]) -> Result<i64, String> {
    Ok(i64::from_be_bytes(v.try_into().map_err(|_| bad_len(v, 8))?))
}
fn bad_len(v: &[u8], want: usize) -> String {
    format!("value has {} bytes, expected {want}", v.len())
}

/// The latest finite timestamp Arrow's microseconds from 1970 hold below the +infinity
/// marker (i64::MAX), in Postgres's own count from 2000: 294247-01-10 04:00:54.775806 UTC.
/// Postgres goes on to 294276 AD.
const LAST_TS_FROM_2000: i64 = i64::MAX - 1 - PG_EPOCH_OFFSET_US;

/// Timestamps: Postgres counts from 2000-01-01, Arrow from 1970-01-01. ±infinity become
/// haul's markers ([`TS_INFINITY`], [`TS_NEG_INFINITY`]). A finite value past
/// [`LAST_TS_FROM_2000`] cannot be held (shifted, it would wrap or become the infinity
/// marker): it is refused with the fix.
fn pg_ts(v: &[u8]) -> Result<i64, String> {
    let t = be_i64(v)?;
    match t {
        i64::MAX => return Ok(TS_INFINITY),
        i64::MIN => return Ok(TS_NEG_INFINITY),
        _ => {}
    }
    if t > LAST_TS_FROM_2000 {
        return Err("a timestamp after 294247-01-10 04:00:54.775806 UTC, the latest an Arrow microsecond timestamp holds; pass --cast <column>=text to export its text form".into());
    }
    Ok(t + PG_EPOCH_OFFSET_US)
}

fn pg_date(v: &[u8]) -> Result<i32, String> {
    let d = be_i32(v)?;
    Ok(match d {
        i32::MAX => DATE_INFINITY,
        i32::MIN => DATE_NEG_INFINITY,
        d => d + PG_EPOCH_OFFSET_DAYS,
    })
}

/// Decodes a binary `numeric` into its unscaled integer at `scale`.
fn pg_numeric(v: &[u8], scale: i8) -> Result<i256, String> {
    if v.len() < 8 {
        return Err(bad_len(v, 8));
    }
    let ndigits = be_i16(&v[0..2])? as usize;
    let weight = be_i16(&v[2..4])? as i32;
    let sign = u16::from_be_bytes([v[4], v[5]]);
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Err("NaN cannot be held by a decimal; pass --cast <col>=text".into()),
        _ => return Err("infinity cannot be held by a decimal; pass --cast <col>=text".into()),
    }
    if v.len() != 8 + 2 * ndigits {
        return Err(bad_len(v, 8 + 2 * ndigits));
    }
    let ten = i256::from_i128(10);
    let mut acc = i256::ZERO;
    for i in 0..ndigits {
        let d = be_i16(&v[8 + 2 * i..10 + 2 * i])? as i128;
        // this digit's weight as a power of ten, relative to the unscaled value
        let exp = (weight - i as i32) * 4 + scale as i32;
        let term = if exp >= 0 {
            i256::from_i128(d).wrapping_mul(ten.wrapping_pow(exp as u32))
        } else {
            let div = 10i128.pow((-exp).min(38) as u32);
            if ((-exp) > 4 || d % div != 0) && d != 0 {
                return Err("value has more fractional digits than the column's scale".into());
            }
            i256::from_i128(d / div)
        };
        acc = acc.wrapping_add(term);
    }
    Ok(if sign == 0x4000 {
        acc.wrapping_neg()
    } else {
        acc
    })
}

/// What to do about an array value a list cannot hold.
const ARRAY_FIX: &str = "pass --cast <column>=text to export its text form, which keeps bounds and dimensions (a load without Parquet output copies arrays exactly)";

/// One column's Arrow builder and how to append a binary value to it.
// one per column, not per row: the size of the largest variant does not matter
#[allow(clippy::large_enum_variant)]
enum Col {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    Oid(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Dec128(Decimal128Builder, i8),
    Dec256(Decimal256Builder, i8),
    /// Text gathered as bytes, validated as UTF-8 once per batch.
    Text(BinaryBuilder),
    Jsonb(BinaryBuilder),
    Bytea(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Ts(TimestampMicrosecondBuilder),
    Interval {
        months: Int32Builder,
        days: Int32Builder,
        micros: Int64Builder,
        nulls: NullBufferBuilder,
    },
    Uuid(FixedSizeBinaryBuilder),
    List {
        field: FieldRef,
        offsets: Vec<i32>,
        nulls: NullBufferBuilder,
        child: Box<Col>,
    },
}

impl Col {
    /// Builders for `cap` values; variable-width values get `value_bytes` bytes (a
    /// guess from `cap` when 0).
    fn new(kind: &PgKind, cap: usize, value_bytes: usize) -> Self {
        let bytes = |guess: usize| {
            if value_bytes > 0 {
                value_bytes
            } else {
                cap * guess
            }
        };
        match kind {
            PgKind::Bool => Col::Bool(BooleanBuilder::with_capacity(cap)),
            PgKind::Int2 => Col::I16(Int16Builder::with_capacity(cap)),
            PgKind::Int4 => Col::I32(Int32Builder::with_capacity(cap)),
            PgKind::Int8 => Col::I64(Int64Builder::with_capacity(cap)),
            PgKind::Oid => Col::Oid(Int64Builder::with_capacity(cap)),
            PgKind::Float4 => Col::F32(Float32Builder::with_capacity(cap)),
            PgKind::Float8 => Col::F64(Float64Builder::with_capacity(cap)),
            PgKind::Numeric { scale, .. } => match kind.arrow_type() {
                t @ DataType::Decimal128(..) => Col::Dec128(
                    Decimal128Builder::with_capacity(cap).with_data_type(t),
                    *scale,
                ),
                t => Col::Dec256(
                    Decimal256Builder::with_capacity(cap).with_data_type(t),
                    *scale,
                ),
            },
            PgKind::Text => Col::Text(BinaryBuilder::with_capacity(cap, bytes(16))),
            PgKind::Jsonb => Col::Jsonb(BinaryBuilder::with_capacity(cap, bytes(64))),
            // a verbatim array is its binary form: Postgres's own, taken as it comes
            PgKind::Bytea | PgKind::ArrayBinary { .. } => {
                Col::Bytea(BinaryBuilder::with_capacity(cap, bytes(16)))
            }
            PgKind::Date => Col::Date(Date32Builder::with_capacity(cap)),
            PgKind::Time => Col::Time(Time64MicrosecondBuilder::with_capacity(cap)),
            PgKind::Timestamp => Col::Ts(TimestampMicrosecondBuilder::with_capacity(cap)),
            PgKind::Timestamptz => {
                Col::Ts(TimestampMicrosecondBuilder::with_capacity(cap).with_timezone("UTC"))
            }
            PgKind::Interval => Col::Interval {
                months: Int32Builder::with_capacity(cap),
                days: Int32Builder::with_capacity(cap),
                micros: Int64Builder::with_capacity(cap),
                nulls: NullBufferBuilder::new(cap),
            },
            PgKind::Uuid => Col::Uuid(FixedSizeBinaryBuilder::with_capacity(cap, 16)),
            PgKind::Array { element } => {
                let DataType::List(field) = kind.arrow_type() else {
                    unreachable!("arrays map to lists")
                };
                Col::List {
                    field,
                    offsets: vec![0],
                    nulls: NullBufferBuilder::new(cap),
                    child: Box::new(Col::new(element, cap, 0)),
                }
            }
        }
    }

    fn append_null(&mut self) {
        match self {
            Col::Bool(b) => b.append_null(),
            Col::I16(b) => b.append_null(),
            Col::I32(b) => b.append_null(),
            Col::I64(b) | Col::Oid(b) => b.append_null(),
            Col::F32(b) => b.append_null(),
            Col::F64(b) => b.append_null(),
            Col::Dec128(b, _) => b.append_null(),
            Col::Dec256(b, _) => b.append_null(),
            Col::Text(b) | Col::Jsonb(b) => b.append_null(),
            Col::Bytea(b) => b.append_null(),
            Col::Date(b) => b.append_null(),
            Col::Time(b) => b.append_null(),
            Col::Ts(b) => b.append_null(),
            Col::Interval {
                months,
                days,
                micros,
                nulls,
            } => {
                months.append_value(0);
                days.append_value(0);
                micros.append_value(0);
                nulls.append_null();
            }
            Col::Uuid(b) => b.append_null(),
            Col::List { offsets, nulls, .. } => {
                offsets.push(*offsets.last().expect("offsets start at 0"));
                nulls.append_null();
            }
        }
    }

    fn append(&mut self, v: &[u8]) -> Result<(), String> {
        match self {
            Col::Bool(b) => match v {
                [x] => b.append_value(*x != 0),
                _ => return Err(bad_len(v, 1)),
            },
            Col::I16(b) => b.append_value(be_i16(v)?),
            Col::I32(b) => b.append_value(be_i32(v)?),
            Col::I64(b) => b.append_value(be_i64(v)?),
            Col::Oid(b) => b.append_value(be_i32(v)? as u32 as i64),
            Col::F32(b) => b.append_value(f32::from_bits(be_i32(v)? as u32)),
            Col::F64(b) => b.append_value(f64::from_bits(be_i64(v)? as u64)),
            Col::Dec128(b, scale) => {
                let x = pg_numeric(v, *scale)?;
                b.append_value(x.to_i128().ok_or("numeric out of Decimal128 range")?);
            }
            Col::Dec256(b, scale) => b.append_value(pg_numeric(v, *scale)?),
            Col::Text(b) => b.append_value(v),
            Col::Jsonb(b) => match v.split_first() {
                Some((1, rest)) => b.append_value(rest),
                _ => return Err("unknown jsonb binary version".into()),
            },
            Col::Bytea(b) => b.append_value(v),
            Col::Date(b) => b.append_value(pg_date(v)?),
            Col::Time(b) => b.append_value(be_i64(v)?),
            Col::Ts(b) => b.append_value(pg_ts(v)?),
            Col::Interval {
                months,
                days,
                micros,
                nulls,
            } => {
                if v.len() != 16 {
                    return Err(bad_len(v, 16));
                }
                micros.append_value(be_i64(&v[0..8])?);
                days.append_value(be_i32(&v[8..12])?);
                months.append_value(be_i32(&v[12..16])?);
                nulls.append_non_null();
            }
            Col::Uuid(b) => b
                .append_value(v)
                .map_err(|e| format!("bad uuid value: {e}"))?,
            Col::List {
                offsets,
                nulls,
                child,
                ..
            } => {
                if v.len() < 12 {
                    return Err(bad_len(v, 12));
                }
                let ndim = be_i32(&v[0..4])?;
                let mut n = 0usize;
                let mut p = 12;
                match ndim {
                    0 => {}
                    1 => {
                        if v.len() < 20 {
                            return Err(bad_len(v, 20));
                        }
                        n = be_i32(&v[12..16])? as usize;
                        let lower = be_i32(&v[16..20])?;
                        if lower != 1 {
                            return Err(format!(
                                "an array value with lower bound {lower} ([{lower}:{}]={{...}}): a list starts at 1, so the bounds would be lost; {ARRAY_FIX}",
                                i64::from(lower) + n as i64 - 1
                            ));
                        }
                        p = 20;
                    }
                    _ => {
                        return Err(format!(
                            "a {ndim}-dimensional array value: a list has one dimension; {ARRAY_FIX}"
                        ));
                    }
                }
                for _ in 0..n {
                    let len = be_i32(v.get(p..p + 4).ok_or("truncated array")?)?;
                    p += 4;
                    if len < 0 {
                        child.append_null();
                    } else {
                        let e = v.get(p..p + len as usize).ok_or("truncated array")?;
                        child.append(e)?;
                        p += len as usize;
                    }
                }
                let last = *offsets.last().expect("offsets start at 0");
                offsets.push(last + n as i32);
                nulls.append_non_null();
            }
        }
        Ok(())
    }

    /// Bytes of variable-width values held (0 for other columns).
    fn value_bytes(&self) -> usize {
        match self {
            Col::Text(b) | Col::Jsonb(b) | Col::Bytea(b) => b.values_slice().len(),
            _ => 0,
        }
    }

    fn finish(&mut self) -> Result<ArrayRef, String> {
        Ok(match self {
            Col::Bool(b) => Arc::new(b.finish()),
            Col::I16(b) => Arc::new(b.finish()),
            Col::I32(b) => Arc::new(b.finish()),
            Col::I64(b) | Col::Oid(b) => Arc::new(b.finish()),
            Col::F32(b) => Arc::new(b.finish()),
            Col::F64(b) => Arc::new(b.finish()),
            Col::Dec128(b, _) => Arc::new(b.finish()),
            Col::Dec256(b, _) => Arc::new(b.finish()),
            Col::Text(b) | Col::Jsonb(b) => Arc::new(
                StringArray::try_from_binary(b.finish())
                    .map_err(|e| format!("a value that is not valid UTF-8 ({e}); a SQL_ASCII database stores any bytes: pass --cast <column>=bytea to export them as they are"))?,
            ),
            Col::Bytea(b) => Arc::new(b.finish()),
            Col::Date(b) => Arc::new(b.finish()),
            Col::Time(b) => Arc::new(b.finish()),
            Col::Ts(b) => Arc::new(b.finish()),
            Col::Interval {
                months,
                days,
                micros,
                nulls,
            } => Arc::new(StructArray::new(
                interval_fields(),
                vec![
                    Arc::new(months.finish()) as ArrayRef,
                    Arc::new(days.finish()),
                    Arc::new(micros.finish()),
                ],
                nulls.finish(),
            )),
            Col::Uuid(b) => Arc::new(b.finish()),
            Col::List {
                field,
                offsets,
                nulls,
                child,
            } => {
                let offs = std::mem::replace(offsets, vec![0]);
                Arc::new(ListArray::new(
                    Arc::clone(field),
                    OffsetBuffer::new(offs.into()),
                    child.finish()?,
                    nulls.finish(),
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 12): timestamps past 294247-01-10 04:00:54.775807 UTC wrapped
    /// (into the infinity markers or a date in 290308 BC).
    #[test]
    fn timestamps_at_the_end_of_arrows_range_are_held_or_refused() {
        let enc = |t: i64| t.to_be_bytes().to_vec();
        assert_eq!(pg_ts(&enc(LAST_TS_FROM_2000)).unwrap(), i64::MAX - 1);
        assert_eq!(pg_ts(&enc(i64::MAX)).unwrap(), i64::MAX, "+infinity");
        assert_eq!(pg_ts(&enc(i64::MIN)).unwrap(), -i64::MAX, "-infinity");
        assert_eq!(pg_ts(&enc(0)).unwrap(), PG_EPOCH_OFFSET_US);
        for past in [LAST_TS_FROM_2000 + 1, LAST_TS_FROM_2000 + 2, i64::MAX - 1] {
            let e = pg_ts(&enc(past)).unwrap_err();
            assert!(e.contains("--cast <column>=text"), "{e}");
        }
    }

    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((digits.len() as i16).to_be_bytes());
        v.extend(weight.to_be_bytes());
        v.extend(sign.to_be_bytes());
        v.extend(dscale.to_be_bytes());
        for d in digits {
            v.extend(d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric_to_unscaled() {
        // 12345.67 = [1, 2345, 6700] weight 1
        let v = numeric(1, 0, 2, &[1, 2345, 6700]);
        assert_eq!(pg_numeric(&v, 2).unwrap(), i256::from_i128(1234567));
        // -0.05
        let v = numeric(-1, 0x4000, 2, &[500]);
        assert_eq!(pg_numeric(&v, 2).unwrap(), i256::from_i128(-5));
        // 1e20 at scale 0: [1] weight 5
        let v = numeric(5, 0, 0, &[1]);
        assert_eq!(
            pg_numeric(&v, 0).unwrap(),
            i256::from_i128(100_000_000_000_000_000_000)
        );
        // zero
        assert_eq!(pg_numeric(&numeric(0, 0, 0, &[]), 3).unwrap(), i256::ZERO);
        assert!(pg_numeric(&numeric(0, 0xC000, 0, &[]), 2).is_err());
    }

    #[test]
    fn split_stream_decodes_identically() {
        use haul_shared::pg::{ColumnInfo, Select};
        let table = TableInfo {
            oid: 1,
            schema: "s".into(),
            name: "t".into(),
            relkind: "r".into(),
            columns: vec![
                ColumnInfo {
                    name: "a".into(),
                    pg_type: "bigint".into(),
                    not_null: false,
                    kind: PgKind::Int8,
                    select: Select::Column,
                },
                ColumnInfo {
                    name: "b".into(),
                    pg_type: "text".into(),
                    not_null: false,
                    kind: PgKind::Text,
                    select: Select::Column,
                },
            ],
        };
        let mut stream = Vec::new();
        stream.extend(SIGNATURE);
        stream.extend([0u8; 8]);
        for i in 0..5i64 {
            stream.extend(2i16.to_be_bytes());
            stream.extend(8i32.to_be_bytes());
            stream.extend(i.to_be_bytes());
            if i == 3 {
                stream.extend((-1i32).to_be_bytes());
            } else {
                let s = format!("row{i}");
                stream.extend((s.len() as i32).to_be_bytes());
                stream.extend(s.as_bytes());
            }
        }
        stream.extend((-1i16).to_be_bytes());
        for piece in [1usize, 3, 7, 1000] {
            let mut d = CopyDecoder::new(&table, 2, 1 << 20);
            let mut out = Vec::new();
            for c in stream.chunks(piece) {
                d.push(c, &mut out).unwrap();
            }
            out.extend(d.finish().unwrap());
            let rows: usize = out.iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows, 5, "piece size {piece}");
            assert_eq!(out.len(), 3);
            let nulls: usize = out.iter().map(|b| b.column(1).null_count()).sum();
            assert_eq!(nulls, 1);
        }
        // truncated stream is an error, not a silent short read
        let mut d = CopyDecoder::new(&table, 2, 1 << 20);
        let mut out = Vec::new();
        d.push(&stream[..stream.len() - 5], &mut out).unwrap();
        assert!(d.finish().is_err());
    }
}
