# CPU image: the node, the CPU workers and the scheduler all run from it.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY dicom_node dicom_node
COPY worker worker
COPY training training
COPY migrations migrations
COPY models models
RUN pip install --no-cache-dir .
ENV PNEUMO_HOME=/data PNEUMO_MODELS_DIR=/app/models
VOLUME /data
EXPOSE 11112
CMD ["pneumo", "node"]
