"""Gradio chat demo for Video-LLaMA models (the original's demo_audiovideo.py / demo_video.py).

    python demo.py --cfg-path eval_configs/video_llama_eval_withaudio.yaml --model_type vicuna --gpu-id 0
    python demo.py --cfg-path eval_configs/tiny.yaml            # CPU smoke test, random or tiny-trained weights

Listens on 127.0.0.1 unless --host or --share is given. All options: python demo.py --help.
The app itself is built in videollm/demo_app.py.
"""

from videollm.demo_app import main

if __name__ == "__main__":
    raise SystemExit(main())
