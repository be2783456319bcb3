# A qopt worker image. CPU by default; for GPU workers build with a CUDA torch:
#   docker build --build-arg TORCH=torch .
FROM python:3.11-slim
ARG TORCH="torch==2.13.0"
WORKDIR /app
RUN pip install --no-cache-dir "${TORCH}"
COPY pyproject.toml README.md ./
COPY qopt ./qopt
COPY studies ./studies
RUN pip install --no-cache-dir ".[postgres,dashboard]"
ENTRYPOINT ["qopt"]
