-- Athena: the class_stats table (one row per (image, class present)) of the output s3://lake/segmentation/.
-- Replace both s3:// locations with your --output; run_date partitions are projected (no MSCK REPAIR, no crawler).
CREATE EXTERNAL TABLE IF NOT EXISTS segmentation.class_stats (
  image_uri string,
  image_version string,
  class_id int,
  class_name string,
  pixel_count bigint,
  pixel_fraction double,
  mean_confidence double,
  bbox_x_min int,
  bbox_y_min int,
  bbox_x_max int,
  bbox_y_max int,
  model_id string,
  run_id string,
  labeled_at timestamp
)
PARTITIONED BY (run_date string)
STORED AS PARQUET
LOCATION 's3://lake/segmentation/class_stats/'
TBLPROPERTIES (
  'projection.enabled' = 'true',
  'projection.run_date.type' = 'date',
  'projection.run_date.format' = 'yyyy-MM-dd',
  'projection.run_date.range' = '2026-01-01,NOW',
  'projection.run_date.interval' = '1',
  'projection.run_date.interval.unit' = 'DAYS',
  'storage.location.template' = 's3://lake/segmentation/class_stats/run_date=${run_date}/'
);
