-- Athena: the labels table (one row per labeled image) of the output s3://lake/segmentation/.
-- Replace both s3:// locations with your --output; run_date partitions are projected (no MSCK REPAIR, no crawler).
CREATE EXTERNAL TABLE IF NOT EXISTS segmentation.labels (
  image_uri string,
  image_version string,
  width int,
  height int,
  label_map binary,
  label_encoding string,
  classes_present array<int>,
  model_id string,
  run_id string,
  labeled_at timestamp,
  mean_confidence double,
  mean_margin double,
  low_confidence_fraction double,
  tiles int
)
PARTITIONED BY (run_date string)
STORED AS PARQUET
LOCATION 's3://lake/segmentation/labels/'
TBLPROPERTIES (
  'projection.enabled' = 'true',
  'projection.run_date.type' = 'date',
  'projection.run_date.format' = 'yyyy-MM-dd',
  'projection.run_date.range' = '2026-01-01,NOW',
  'projection.run_date.interval' = '1',
  'projection.run_date.interval.unit' = 'DAYS',
  'storage.location.template' = 's3://lake/segmentation/labels/run_date=${run_date}/'
);
