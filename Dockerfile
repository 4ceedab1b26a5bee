# CPU image: the node, the CPU workers, the scheduler, Flower and the dashboard run from it.
# The code stays in /app and is installed editable: `pneumo db upgrade` finds alembic.ini and
# migrations/ next to core/, and models/ is the registry the workers serve from.
FROM python:3.11-slim

# dcmtk: echoscu for the node's health check.
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies in a layer of their own (from pyproject.toml), so a code change does not
# reinstall TensorFlow. The "ops" extra is Flower.
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/requirements.py
RUN python deploy/requirements.py ops > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

COPY alembic.ini ./
COPY core core
COPY ops ops
COPY dicom_node dicom_node
COPY serving serving
COPY worker worker
COPY training training
COPY migrations migrations
COPY models models
RUN pip install --no-cache-dir --no-deps -e .

# Not root: the services only write to /data (PNEUMO_HOME, a volume) and their home directory.
RUN useradd --system --create-home --uid 10001 pneumo && mkdir -p /data && chown pneumo /data
USER pneumo
ENV PNEUMO_HOME=/data PNEUMO_MODELS_DIR=/app/models PNEUMO_HOST=0.0.0.0 \
    KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 11112 8080 5555
CMD ["pneumo", "node"]
