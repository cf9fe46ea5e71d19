//! `--lineage-columns`: every batch of the Parquet output gets the job's id and its
//! snapshot's time as two more columns, `_haul_job_id` and `_haul_extracted_at`, so that
//! downstream tools (dbt's source freshness, de-duplication in a silver layer, lineage)
//! need not guess when and by which job a row was read.

use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{ArrowError, Field, Schema, SchemaRef};

/// Adds the lineage columns to the batches of one chunk.
pub struct Lineage {
    job: String,
    at_us: i64,
    schema: SchemaRef,
}

impl Lineage {
    /// For batches of `schema`, read by job `job` in a snapshot taken at `snapshot_at`
    /// (RFC 3339).
    pub fn new(schema: &SchemaRef, job: &str, snapshot_at: &str) -> Result<Self, String> {
        let at = chrono::DateTime::parse_from_rfc3339(snapshot_at)
            .map_err(|e| format!("the plan's snapshot time {snapshot_at:?}: {e}"))?;
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.extend(haul_shared::jobs::lineage_fields());
        Ok(Self {
            job: job.to_owned(),
            at_us: at.timestamp_micros(),
            schema: Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        })
    }

    /// The output's schema: the source's columns, then the lineage columns.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    pub fn add(&self, batch: RecordBatch) -> Result<RecordBatch, ArrowError> {
        let n = batch.num_rows();
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            self.job.as_str(),
            n,
        ))) as ArrayRef);
        columns.push(Arc::new(
            TimestampMicrosecondArray::from_value(self.at_us, n).with_timezone("UTC"),
        ));
        RecordBatch::try_new(Arc::clone(&self.schema), columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Int64Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::TimestampMicrosecondType;
    use arrow_schema::DataType;

    #[test]
    fn every_row_gets_the_job_and_the_snapshot_time() {
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let l = Lineage::new(&schema, "nightly-1", "2026-11-30T01:02:03.000004Z").unwrap();
        let b = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(vec![1, 2, 3]))],
        )
        .unwrap();
        let out = l.add(b).unwrap();
        assert_eq!(out.num_columns(), 3);
        let jobs = out.column(1).as_string::<i32>();
        assert!(jobs.iter().all(|j| j == Some("nightly-1")));
        let at = out.column(2).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(at.len(), 3);
        assert!(at.iter().all(|t| t == Some(1_796_000_523_000_004)));
        assert!(Lineage::new(&schema, "j", "yesterday").is_err());
    }
}
