# CPU image: the node, the CPU workers, the scheduler, Flower and the dashboard run from it.
# The code is installed as a package (no editable checkout); /models is the registry
# (PNEUMO_MODELS_DIR), a volume the CLI and the workers share.
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

# Installed, not editable: the product runs from site-packages, with its migrations, alembic.ini
# and templates as package data; the sources are removed after the install.
COPY core /src/core
COPY ops /src/ops
COPY dicom_node /src/dicom_node
COPY serving /src/serving
COPY worker /src/worker
COPY training /src/training
# The released registry: compose mounts the named volume "models" here, which Docker seeds with
# these versions the first time; a version served or adapted there outlives the container.
COPY models /models
RUN cp pyproject.toml README.md /src/ && pip install --no-cache-dir --no-deps /src && rm -rf /src

# Not root: the services only write to /data (PNEUMO_HOME, a volume) and their home directory.
RUN useradd --system --create-home --uid 10001 pneumo && mkdir -p /data && chown -R pneumo /data /models
USER pneumo
ENV PNEUMO_HOME=/data PNEUMO_MODELS_DIR=/models PNEUMO_HOST=0.0.0.0 \
    KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
VOLUME /data /models
EXPOSE 11112 8080 5555
CMD ["pneumo", "node"]
