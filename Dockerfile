# AST on KServe: the predictor with CPU-only PyTorch. Build: docker build -t <registry>/ast-kserve:0.1.0 .
# Two stages: the first builds a virtualenv (pip caches, compilers' leftovers), the second copies only it.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
# torch first, from the CPU-only wheel index: PyPI's torch==2.13.0 is the multi-GB CUDA build.
# The rest then finds torch==2.13.0 satisfied (2.13.0+cpu) and leaves it be.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r /tmp/requirements.txt

FROM python:3.11-slim
# libsndfile (with FLAC, Ogg Vorbis/Opus and MP3) comes inside soundfile's wheel, FFmpeg's libraries (M4A,
# WebM, AAC) inside av's: no apt packages needed.
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY predictor/ /app/predictor/
# Bytecode compiled now: uid 1000 cannot write it into /app at run time.
RUN python -m compileall -q /app/predictor
# HOME and caches where uid 1000 may write: the ONNX export cache (the default engine's) and the hub cache.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/huggingface \
    ONNX_CACHE_DIR=/tmp/ast-onnx
USER 1000:1000
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "predictor"]
