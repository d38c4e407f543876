# AST on KServe: the predictor with CPU-only PyTorch. Build: docker build -t <registry>/ast-kserve:0.1.0 .
# The CUDA image, for GPU nodes (make image VARIANT=cuda): --build-arg VARIANT=cuda --build-arg TORCH_SOURCE=
# (PyPI's torch==2.13.0 is the CUDA build; its wheels bring CUDA's libraries, the node brings the driver).
# Two stages: the first builds a virtualenv (pip caches, compilers' leftovers), the second copies only it.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
# Where the CPU-only torch comes from: PyPI's torch==2.13.0 is the multi-GB CUDA build. A mirror:
# --build-arg TORCH_SOURCE="--index-url https://mirror.example/whl/cpu"; a directory of wheels
# mounted into the build: --build-arg TORCH_SOURCE="--find-links /wheels". pip also reads PIP_*
# build arguments (PIP_INDEX_URL for a PyPI mirror, PIP_CERT for a proxy's CA bundle).
ARG TORCH_SOURCE="--index-url https://download.pytorch.org/whl/cpu"
# cuda: leaves out what a GPU image never runs (OpenVINO, and NNCF, its int8 quantizer).
ARG VARIANT=cpu
ARG PIP_INDEX_URL
ARG PIP_CERT
# torch first; the rest then finds torch==2.13.0 satisfied (2.13.0+cpu) and leaves it be.
# hadolint ignore=SC2086,DL3013
RUN pip install $TORCH_SOURCE torch==2.13.0 \
    && if [ "$VARIANT" = cuda ]; then sed -i -E '/^(openvino|nncf)==/d' /tmp/requirements.txt; fi \
    && pip install -r /tmp/requirements.txt
# What serving never runs: the packages' test suites (torch's C++ test binaries among them), torch's C++
# headers (for compiling extensions; nothing here compiles), OpenVINO's GPU and NPU plugins, pip itself;
# in the CUDA image, Triton (torch.compile's compiler: the GPU engine runs eager).
RUN site=/opt/venv/lib/python3.11/site-packages \
    && find "$site" -name '*.dist-info' -prune -o -type d \( -name tests -o -name test \) -prune -exec rm -rf {} + \
    && rm -rf "$site/torch/include" "$site"/torch/bin/test_* "$site"/torch/bin/*Test \
        "$site"/openvino/libs/libopenvino_intel_gpu_plugin.so "$site"/openvino/libs/libopenvino_intel_npu_plugin.so \
    && if [ "$VARIANT" = cuda ]; then rm -rf "$site"/triton "$site"/triton-*.dist-info; fi \
    && pip uninstall -q -y pip

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
    AST_ONNX_CACHE_DIR=/tmp/ast-onnx
USER 1000:1000
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "predictor"]
