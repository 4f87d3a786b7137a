# syntax=docker/dockerfile:1
# Build stage: install the operator and its pinned dependencies into a virtual environment.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY operator ./operator
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes -r requirements.lock \
 && /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip uninstall -y pip setuptools wheel

# Runtime stage: the interpreter and the virtual environment, nothing else; non-root.
FROM python:3.11-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="autotek-operator" \
      org.opencontainers.image.description="Keeps AutoTek OAuth 2.0 bearer tokens fresh in Kubernetes Secrets" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/autotek/autotek-operator"
RUN python -m pip uninstall -y pip setuptools wheel \
 && rm -rf /usr/local/lib/python3.11/ensurepip
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["autotek-operator"]
CMD ["run"]
