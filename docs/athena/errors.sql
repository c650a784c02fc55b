-- Athena: the errors table (one row per image that could not be labeled) of the output s3://lake/segmentation/.
-- Replace both s3:// locations with your --output; run_date partitions are projected (no MSCK REPAIR, no crawler).
CREATE EXTERNAL TABLE IF NOT EXISTS segmentation.errors (
  image_uri string,
  image_version string,
  stage string,
  error string,
  model_id string,
  run_id string,
  failed_at timestamp
)
PARTITIONED BY (run_date string)
STORED AS PARQUET
LOCATION 's3://lake/segmentation/errors/'
TBLPROPERTIES (
  'projection.enabled' = 'true',
  'projection.run_date.type' = 'date',
  'projection.run_date.format' = 'yyyy-MM-dd',
  'projection.run_date.range' = '2026-01-01,NOW',
  'projection.run_date.interval' = '1',
  'projection.run_date.interval.unit' = 'DAYS',
  'storage.location.template' = 's3://lake/segmentation/errors/run_date=${run_date}/'
);
