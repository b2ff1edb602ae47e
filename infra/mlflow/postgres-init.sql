-- Second database for MLflow's basic-auth user store (the tracking data lives in database "mlflow").
CREATE DATABASE mlflow_auth OWNER mlflow;
