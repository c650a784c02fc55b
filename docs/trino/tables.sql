-- Trino's Hive connector (self-hosted Trino): the three tables of the output s3://lake/segmentation/.
-- Set hive.parquet.time-zone=UTC in the catalog (else timestamps shift by the JVM's zone); after each night, register
-- its partitions with the sync_partition_metadata calls at the end (Trino's MSCK REPAIR).
CREATE SCHEMA IF NOT EXISTS hive.segmentation;

CREATE TABLE IF NOT EXISTS hive.segmentation.labels (
  image_uri varchar,
  image_version varchar,
  width integer,
  height integer,
  label_map varbinary,
  label_encoding varchar,
  classes_present array(integer),
  model_id varchar,
  run_id varchar,
  labeled_at timestamp(3),
  mean_confidence double,
  mean_margin double,
  low_confidence_fraction double,
  tiles integer,
  run_date varchar
)
WITH (
  format = 'PARQUET',
  external_location = 's3://lake/segmentation/labels',
  partitioned_by = ARRAY['run_date']
);

CREATE TABLE IF NOT EXISTS hive.segmentation.class_stats (
  image_uri varchar,
  image_version varchar,
  class_id integer,
  class_name varchar,
  pixel_count bigint,
  pixel_fraction double,
  mean_confidence double,
  bbox_x_min integer,
  bbox_y_min integer,
  bbox_x_max integer,
  bbox_y_max integer,
  model_id varchar,
  run_id varchar,
  labeled_at timestamp(3),
  run_date varchar
)
WITH (
  format = 'PARQUET',
  external_location = 's3://lake/segmentation/class_stats',
  partitioned_by = ARRAY['run_date']
);

CREATE TABLE IF NOT EXISTS hive.segmentation.errors (
  image_uri varchar,
  image_version varchar,
  stage varchar,
  error varchar,
  model_id varchar,
  run_id varchar,
  failed_at timestamp(3),
  run_date varchar
)
WITH (
  format = 'PARQUET',
  external_location = 's3://lake/segmentation/errors',
  partitioned_by = ARRAY['run_date']
);

CALL hive.system.sync_partition_metadata('segmentation', 'labels', 'ADD');
CALL hive.system.sync_partition_metadata('segmentation', 'class_stats', 'ADD');
CALL hive.system.sync_partition_metadata('segmentation', 'errors', 'ADD');
